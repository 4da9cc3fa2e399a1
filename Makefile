# Development host for the TDD pack: a venv with ComfyUI 0.33.0 (scripts/bootstrap.sh: from
# ../shared/hosts/comfyui-0.33.0.tar.gz, else a git clone at v0.33.0, else the registry's 0.3.75).
#   make env    build .venv/ and .host/ComfyUI (idempotent; COMFYUI_PATH=... uses another ComfyUI)
#   make test   env, then the test suite (PYTEST_ARGS='-m "not server"' skips the server tests), then its
#               server-level node tests again on the oldest supported ComfyUI (0.3.52)
#   make run    env, then ComfyUI with this pack on http://127.0.0.1:$(PORT) (base dir .host/base);
#               WITH_TEST_NODES=1 also installs the test-only tiny model node (TDDTestTinyModel)
#   make demo   env, then the shipped demo workflow in a headless ComfyUI: teacher vs TDD grid in out/
#   make demo-model  rebuild the demo teacher (demo/build_teacher.sh, ~3.6 h) and its TDD LoRA (demo/distill_demo.py, ~35 min)
#   make quality  env, then bench/quality.py --preset small: TDD vs TCD vs LCM students of the demo teacher
#               (19 min on 2 cores, students trained 2 at a time; out/quality_small/quality.md); QUALITY_PRESET=full (~2 h) writes docs/quality.md
PORT ?= 8188
PY := .venv/bin/python
PYTEST_ARGS ?=
WITH_TEST_NODES ?=
QUALITY_PRESET ?= small
QUALITY_JOBS ?= 2

.PHONY: env test run demo demo-model quality

env:
	bash scripts/bootstrap.sh

# The server-level node tests run a second time on the oldest supported ComfyUI (scripts/bootstrap.sh
# unpacks it; TDD_NO_OLD_HOST=1 skips both, and so does a COMFYUI_PATH of your own).
OLDEST := 0.3.52
OLDEST_HOST_TESTS := tests/test_server_tdd.py tests/test_bad_inputs.py tests/test_lora_settings.py tests/test_workflows.py tests/test_nodes.py

test: env
	@t0=$$(date +%s); $(PY) -m pytest -q tests $(PYTEST_ARGS); rc=$$?; \
	  echo "== phase 1 (the whole suite, default host): $$(( $$(date +%s) - t0 )) s"; exit $$rc
	@if [ -z "$(TDD_NO_OLD_HOST)" ] && [ -z "$(COMFYUI_PATH)" ]; then \
	  echo "== the server-level tests again, on the oldest supported ComfyUI $(OLDEST) =="; t0=$$(date +%s); \
	  COMFYUI_PATH="$(CURDIR)/.host/ComfyUI-$(OLDEST)" PYTHONPATH="$(CURDIR)/.host/pydeps-$(OLDEST)" \
	    $(PY) -m pytest -q -m "not browser" $(OLDEST_HOST_TESTS) $(PYTEST_ARGS); rc=$$?; \
	  echo "== phase 2 (server-level tests, ComfyUI $(OLDEST)): $$(( $$(date +%s) - t0 )) s"; exit $$rc; fi

run:
	@set -e; comfy="$$(bash scripts/bootstrap.sh)"; base="$(CURDIR)/.host/base"; \
	mkdir -p "$$base/models/loras" "$$base/models/checkpoints" "$$base/input" "$$base/output" "$$base/user"; \
	if [ -n "$(WITH_TEST_NODES)" ]; then ln -sfn "$(CURDIR)/tests/tdd_test_nodes" "$$base/custom_nodes/tdd_test_nodes"; \
	else rm -f "$$base/custom_nodes/tdd_test_nodes"; fi; \
	echo "ComfyUI with the TDD pack: http://127.0.0.1:$(PORT)"; \
	cd "$$comfy" && exec "$(CURDIR)/$(PY)" main.py --cpu --listen 127.0.0.1 --port $(PORT) --base-directory "$$base" \
	  --database-url "sqlite:///$$base/user/comfyui.db"

demo: env
	$(PY) demo/run_demo.py

demo-model: env
	PY="$(CURDIR)/$(PY)" bash demo/build_teacher.sh --out demo/weights
	$(PY) demo/distill_demo.py

quality: env
	$(PY) bench/quality.py --preset $(QUALITY_PRESET) --jobs $(QUALITY_JOBS)

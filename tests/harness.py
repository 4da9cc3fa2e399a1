"""Helpers to run the pack inside a real ComfyUI host (no mocks): a server subprocess and an
in-process host.  Used by the tests and by demo scripts.

The host tree comes from ``$COMFYUI_PATH`` or ``<repo>/.host/ComfyUI`` (built by
``scripts/bootstrap.sh``).  Both the server and the in-process host use a *base directory*
(``--base-directory``) laid out by :func:`make_base_dir`: ``custom_nodes/tdd-comfyui`` -> this repo,
``custom_nodes/tdd_test_nodes`` -> ``tests/tdd_test_nodes`` (test-only), plus ``models/loras``,
``models/checkpoints``, ``input``, ``output``, ``user``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
TEST_PACK = Path(__file__).resolve().parent / "tdd_test_nodes"
PACK_DIRNAME = "tdd-comfyui"
TEST_PACK_DIRNAME = "tdd_test_nodes"
BASE_SUBDIRS = ("custom_nodes", "models/loras", "models/checkpoints", "input", "output", "user")


def comfyui_path() -> Path:
    """The ComfyUI tree: ``$COMFYUI_PATH`` or ``<repo>/.host/ComfyUI``."""
    p = os.environ.get("COMFYUI_PATH")
    return Path(p).resolve() if p else REPO / ".host" / "ComfyUI"


def _symlink(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return
        if link.is_symlink() or link.is_file():
            link.unlink()
        else:
            raise FileExistsError(f"{link} exists and is not a symlink")
    link.symlink_to(target, target_is_directory=True)


def make_base_dir(base: Path | str, with_test_pack: bool = True) -> Path:
    """Create (idempotently) a ComfyUI base directory with this pack (and the test pack) installed."""
    base = Path(base).resolve()
    for sub in BASE_SUBDIRS:
        (base / sub).mkdir(parents=True, exist_ok=True)
    _symlink(REPO, base / "custom_nodes" / PACK_DIRNAME)
    if with_test_pack:
        _symlink(TEST_PACK, base / "custom_nodes" / TEST_PACK_DIRNAME)
    return base


# ------------------------------------------------------------------------------------------------
# Import failures in a ComfyUI log
# ------------------------------------------------------------------------------------------------

# Lines ComfyUI 0.3.75 writes when a custom node (or built-in extra) fails to load:
#   "Cannot import /.../custom_nodes/<pack> module for custom nodes: <exception>"
#   "   0.3 seconds (IMPORT FAILED): /.../custom_nodes/<pack>"
#   "IMPORT FAILED: nodes_audio.py"                                  (built-in comfy_extras)
#   "Skip /.../custom_nodes/<pack> module for custom nodes due to the lack of NODE_CLASS_MAPPINGS ..."
#   "Error while calling comfy_entrypoint in /.../custom_nodes/<pack>: <exception>"
#   "comfy_entrypoint in /.../<pack> is not callable / did not return ..., skipping."
_FAILURE_PATTERNS = (
    re.compile(r"Cannot import (?P<path>.+?) module for custom nodes: (?P<why>.*)"),
    re.compile(r"\(IMPORT FAILED\): (?P<path>.+)$"),
    re.compile(r"^\s*IMPORT FAILED: (?P<path>.+)$"),
    re.compile(r"Skip (?P<path>.+?) module for custom nodes due to (?P<why>.*)"),
    re.compile(r"Error while calling comfy_entrypoint in (?P<path>.+?): (?P<why>.*)"),
    re.compile(r"comfy_entrypoint in (?P<path>.+?) (?P<why>(is not callable|did not return).*)"),
)


def import_failures(log_text: str, names=(PACK_DIRNAME, TEST_PACK_DIRNAME)) -> list[str]:
    """Log lines reporting an import failure of the custom-node packs whose directory name is in
    ``names`` (default: this pack and the test pack).  Other failures (e.g. the host's audio nodes
    without torchaudio: ``IMPORT FAILED: nodes_audio.py``) are ignored."""
    out = []
    for line in log_text.splitlines():
        for pat in _FAILURE_PATTERNS:
            m = pat.search(line)
            if not m:
                continue
            path = m.group("path").strip().rstrip(os.sep)
            if Path(path).name in names or path in names:
                out.append(line.strip())
            break
    return out


def all_import_failures(log_text: str) -> list[str]:
    """Every import-failure line (any pack or built-in), for diagnostics."""
    return [ln.strip() for ln in log_text.splitlines() if any(p.search(ln) for p in _FAILURE_PATTERNS)]


# ------------------------------------------------------------------------------------------------
# ComfyUI server subprocess
# ------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyError(RuntimeError):
    """A prompt was rejected or failed; ``.detail`` holds the server's JSON."""

    def __init__(self, msg: str, detail=None):
        super().__init__(msg)
        self.detail = detail


class ComfyServer:
    """``python main.py --cpu --listen 127.0.0.1 --port N --base-directory DIR`` as a subprocess.

    >>> srv = ComfyServer(base_dir).start()
    >>> out = srv.run(graph)          # history entry of the finished prompt
    >>> srv.stop()
    """

    def __init__(self, base_dir, port: int | None = None, comfyui: Path | None = None,
                 python: str | None = None, extra_args=(), log_path=None, env=None):
        self.base_dir = make_base_dir(base_dir)
        self.port = port or free_port()
        self.comfyui = Path(comfyui or comfyui_path())
        self.python = python or sys.executable
        self.extra_args = list(extra_args)
        self.log_path = Path(log_path) if log_path else self.base_dir / "comfyui.log"
        self.env = env
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "ComfyServer":
        if not (self.comfyui / "main.py").is_file():
            raise FileNotFoundError(f"no ComfyUI at {self.comfyui} (run scripts/bootstrap.sh or set COMFYUI_PATH)")
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir),
               # default is <ComfyUI>/user/comfyui.db, whose folder the unpacked tree lacks
               "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}", *self.extra_args]
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log_file = open(self.log_path, "wb")
        log.info("starting ComfyUI: %s (log %s)", " ".join(cmd), self.log_path)
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                self._get("/system_stats", timeout=5)
                log.info("ComfyUI up at %s", self.url)
                return self
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.stop()

    # -- log --------------------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def import_failures(self, names=(PACK_DIRNAME, TEST_PACK_DIRNAME)) -> list[str]:
        return import_failures(self.log_text(), names)

    # -- HTTP -------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body=None, timeout: float = 30.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = raw.decode(errors="replace")
        return status, payload

    def _get(self, path: str, timeout: float = 30.0):
        status, payload = self._request("GET", path, timeout=timeout)
        if status != 200:
            raise ComfyError(f"GET {path} -> {status}", payload)
        return payload

    def object_info(self, node: str | None = None) -> dict:
        return self._get("/object_info" + (f"/{node}" if node else ""), timeout=60)

    def system_stats(self) -> dict:
        return self._get("/system_stats")

    def history(self, prompt_id: str | None = None) -> dict:
        return self._get("/history" + (f"/{prompt_id}" if prompt_id else ""))

    def queue(self, prompt_graph: dict, extra_data: dict | None = None):
        """POST /prompt -> (status_code, json).  200: ``{"prompt_id": ...}``; 400: validation errors
        (``{"error": {...}, "node_errors": {...}}``)."""
        body = {"prompt": prompt_graph, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        return self._request("POST", "/prompt", body)

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.25) -> dict:
        """Poll /history/{id} until the prompt finished (success or error) -> its history entry
        (``{"prompt": ..., "outputs": {...}, "status": {"status_str": "success"|"error",
        "completed": bool, "messages": [...]}}``)."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.history(prompt_id)
            entry = (h or {}).get(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                st = entry.get("status", {})
                if st.get("completed") or st.get("status_str") == "error":
                    return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(poll)

    def run(self, prompt_graph: dict, timeout: float = 300.0) -> dict:
        """Queue, wait, and return the history entry; raise :class:`ComfyError` with the server's
        error (validation errors or the execution_error message) on failure."""
        status, payload = self.queue(prompt_graph)
        if status != 200 or not isinstance(payload, dict) or "prompt_id" not in payload:
            raise ComfyError(f"prompt rejected ({status}): {json.dumps(payload, indent=1)[:4000]}", payload)
        entry = self.wait(payload["prompt_id"], timeout)
        if entry.get("status", {}).get("status_str") != "success":
            raise ComfyError(f"prompt failed: {execution_error(entry) or entry.get('status')}", entry)
        return entry

    def output_images(self, entry: dict) -> list[Path]:
        """Paths of the images an entry's SaveImage/PreviewImage nodes wrote."""
        paths = []
        for node_out in entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                root = {"output": "output", "temp": "temp", "input": "input"}.get(img.get("type"), "output")
                paths.append(self.base_dir / root / img.get("subfolder", "") / img["filename"])
        return paths


def execution_error(entry: dict) -> dict | None:
    """The ``execution_error`` message data of a history entry (node_id, node_type,
    exception_type, exception_message, traceback), or None."""
    for msg in entry.get("status", {}).get("messages", []):
        if isinstance(msg, (list, tuple)) and len(msg) == 2 and msg[0] == "execution_error":
            return msg[1]
    return None


# ------------------------------------------------------------------------------------------------
# In-process host
# ------------------------------------------------------------------------------------------------

_HOST = {"nodes": None, "base_dir": None, "log": ""}


class _LogText(logging.Handler):
    """Collects the messages of the log records of the in-process host's start-up."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def inprocess_log() -> str:
    """What the in-process host logged while it loaded (its built-in extras and custom nodes)."""
    return _HOST["log"]


def inprocess_host(base_dir, comfyui: Path | None = None):
    """Load ComfyUI into this process (once) with ``base_dir`` as its base directory and all its
    custom nodes loaded; returns ComfyUI's ``nodes`` module (``nodes.NODE_CLASS_MAPPINGS`` holds
    the core nodes, this pack's nodes and ``TDDTestTinyModel``).

    Must be called with the same ``base_dir`` every time in one process (ComfyUI's paths are
    module globals)."""
    base_dir = make_base_dir(base_dir)
    if _HOST["nodes"] is not None:
        if _HOST["base_dir"] != base_dir:
            raise RuntimeError(f"in-process ComfyUI already initialised with {_HOST['base_dir']}")
        return _HOST["nodes"]
    root = str(Path(comfyui or comfyui_path()).resolve())
    clash = sys.modules.get("nodes")
    if clash is not None and os.path.dirname(os.path.realpath(getattr(clash, "__file__", "") or "")) != root:
        raise RuntimeError(f"a different top-level 'nodes' module is already imported ({clash!r}); "
                           "import the pack through pack_module(), not as top-level 'nodes'")
    if not os.path.isfile(os.path.join(root, "main.py")):
        raise FileNotFoundError(f"no ComfyUI at {root} (run scripts/bootstrap.sh or set COMFYUI_PATH)")
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.options

    comfy.options.enable_args_parsing()
    saved_argv = sys.argv
    sys.argv = [os.path.join(root, "main.py"), "--cpu", "--base-directory", str(base_dir)]
    try:
        import comfy.cli_args  # noqa: F401  (parses sys.argv on import)
        # As main.py does: import ComfyUI's ``utils`` package before ``nodes``, which puts
        # ComfyUI/comfy on sys.path[0] (where ``comfy/utils.py`` would then shadow ``utils``).
        import utils.extra_config  # noqa: F401
        import nodes
        import server

        # As main.py does: the PromptServer exists before the nodes load (ComfyUI 0.33's built-in
        # extensions register node replacements on it). It is never started: no port is opened.
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        server.PromptServer(loop)
        collect, root_logger = _LogText(), logging.getLogger()
        level = root_logger.level
        root_logger.addHandler(collect)
        root_logger.setLevel(min(level, logging.INFO))  # (the custom-node import times are INFO lines)
        try:
            loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        finally:
            root_logger.removeHandler(collect)
            root_logger.setLevel(level)
        _HOST["log"] = "\n".join(collect.lines)
    finally:
        sys.argv = saved_argv
    if os.path.dirname(os.path.realpath(nodes.__file__)) != root:
        raise RuntimeError(f"imported the wrong 'nodes' module: {nodes.__file__} (expected ComfyUI's)")
    _HOST.update(nodes=nodes, base_dir=base_dir)  # (and "log", set above)
    return nodes


def pack_module(base_dir=None, dirname: str = PACK_DIRNAME):
    """The pack's root module as the in-process ComfyUI loaded it (``sys.modules`` key is the
    custom_nodes path with '.' replaced by '_x_'); None if it failed to import.  Its submodules are
    ``<that name>.nodes``, ``<that name>.tdd_core``, ..."""
    base_dir = Path(base_dir).resolve() if base_dir else _HOST["base_dir"]
    if base_dir is None:
        raise RuntimeError("in-process ComfyUI not initialised (call inprocess_host first)")
    return sys.modules.get(os.path.join(str(base_dir), "custom_nodes", dirname).replace(".", "_x_"))


def run_node(nodes_module, class_name: str, **inputs):
    """Execute one node class in-process (V1 or V3) -> its output tuple."""
    cls = nodes_module.NODE_CLASS_MAPPINGS[class_name]
    if hasattr(cls, "GET_SCHEMA") and hasattr(cls, "execute") and not hasattr(cls, "FUNCTION"):
        res = cls.execute(**inputs)
    else:
        fn = getattr(cls, "FUNCTION", None)
        if fn is None and hasattr(cls, "GET_SCHEMA"):
            res = cls.execute(**inputs)
        else:
            res = getattr(cls(), fn)(**inputs)
    if asyncio.iscoroutine(res):
        res = asyncio.run(res)
    if hasattr(res, "result"):  # V3 io.NodeOutput
        res = res.result
    if isinstance(res, dict) and "result" in res:
        res = res["result"]
    return tuple(res) if res is not None else ()


# ------------------------------------------------------------------------------------------------
# Graphs
# ------------------------------------------------------------------------------------------------

def tiny_txt2img_graph(seed: int = 0, steps: int = 2, sampler: str = "euler", scheduler: str = "normal",
                       cfg: float = 2.0, size: int = 64, prefix: str = "tdd_test", lora: str | None = None,
                       lora_strength: float = 1.0) -> dict:
    """A stock API-format graph: TDDTestTinyModel -> (LoraLoader) -> CLIPTextEncode x2 ->
    EmptyLatentImage -> KSampler -> VAEDecode -> SaveImage.  Node ids are strings "1".."9"."""
    model, clip = ["1", 0], ["1", 1]
    g = {"1": {"class_type": "TDDTestTinyModel", "inputs": {"seed": seed}}}
    if lora:
        g["9"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": lora,
                                                         "strength_model": lora_strength, "strength_clip": lora_strength}}
        model, clip = ["9", 0], ["9", 1]
    g.update({
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a red cube"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": model, "positive": ["2", 0], "negative": ["3", 0],
                                                    "latent_image": ["4", 0], "seed": seed, "steps": steps, "cfg": cfg,
                                                    "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    })
    return g

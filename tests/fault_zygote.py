"""Test helper (never product code): a "zygote" that imports torch, ComfyUI and the trainer and builds the
tiny teacher once, then forks one child per training attempt, so that a kill harness can kill dozens of
runs without paying the interpreter's start-up each time.

Protocol: one JSON request per stdin line, one JSON reply per stdout line.

  request  {"cfg": {TrainConfig fields}, "progress": path, "kill": plan}
  reply    {"pid", "exit": code | null, "signal": number | null, "seconds"}

Plans (``kill``):
  null                          run to the end
  {"census": path}              run to the end, appending every kill point (an event) to ``path`` as JSON lines
  {"timer": seconds}            the zygote SIGKILLs the child that many seconds after the fork
  {"label": [...], "mode": m}   the child SIGKILLs itself at the event ``label`` (see :class:`Events`)

Events are the moments a kill can hit, named by where they are (``label``) and offering ``modes``:
  ["forward", step, i]          i-th UNet forward of training step ``step`` (mode "at")
  ["log_row", step]             right after log.csv got the row of ``step`` ("after")
  ["ckpt_file", step, name]     a file inside the checkpoint folder being built: "partial" (the temporary file
                                cut to half, as a kill mid-write leaves it), "before" / "after" its rename
  ["ckpt_dir", step]            the checkpoint folder renamed into place ("before", "after")
  ["latest", step]              ``latest`` replaced ("partial", "before", "after")
  ["prune", step]               an old checkpoint renamed away by the save of ``step`` ("before", "after"),
  ["prune_rm", step]            ... and half deleted ("partial")
  ["lora", max_steps + 1]       the final LoRA at --out ("partial", "before", "after")
  ["cache", 0.5, name]          a latent-cache record ("partial", "before", "after"); only a fresh run writes them
  ["log_rewrite", 0]            a resumed run rewriting log.csv without the rows after its checkpoint

The child reports each completed step (``on_step``) and the event it kills itself at to ``progress`` with
unbuffered writes, which a SIGKILL can't lose.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the CLIP tokenizer's thread pool would make fork unsafe
sys.path.insert(0, str(Path(__file__).resolve().parent))

import trainer_fixtures as fx  # noqa: E402

TMP_DIR = re.compile(r"^\.checkpoint-(\d+)\.tmp-\d+$")
OLD_DIR = re.compile(r"^\.checkpoint-(\d+)\.old-\d+$")
CKPT = re.compile(r"^checkpoint-(\d+)$")


class Events:
    """The child's kill points: patched write functions report events here; the one the plan names kills."""

    def __init__(self, cfg, plan: dict | None, progress: str):
        self.out, self.run_dir = Path(cfg.out).absolute(), Path(cfg.run_dir).absolute()
        self.cache = Path(cfg.cache_dir).absolute() if cfg.cache_dir else None
        self.plan, self.progress, self.max_steps = plan or {}, progress, cfg.max_steps
        self.census = self.plan.get("census")
        self.step, self.forwards, self.t0 = 0, 0, time.perf_counter()

    def write(self, path: str, text: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def hit(self, label: list, modes: tuple, mode: str, damage=None) -> None:
        """The event ``label`` happens at ``mode`` (one of its ``modes``); die if the plan says so."""
        if self.census and mode == modes[0]:
            self.write(self.census, json.dumps({"label": label, "modes": list(modes),
                                                "t": time.perf_counter() - self.t0}) + "\n")
        if self.plan.get("label") == label and self.plan.get("mode") == mode:
            if damage is not None:
                damage()
            self.write(self.progress, json.dumps({"killed_at": label, "mode": mode}) + "\n")
            os.kill(os.getpid(), signal.SIGKILL)

    # ---- what a path is ----------------------------------------------------------------------
    def classify(self, src, dst) -> tuple[list, tuple] | None:
        """(label, modes) of an ``os.replace`` of ``src`` onto ``dst``, or None for a file no loader reads."""
        dst = Path(dst).absolute()
        parent = dst.parent
        if TMP_DIR.match(parent.name) and parent.parent == self.run_dir:
            return ["ckpt_file", int(TMP_DIR.match(parent.name)[1]), dst.name], ("partial", "before", "after")
        if CKPT.match(dst.name) and parent == self.run_dir:
            return ["ckpt_dir", int(CKPT.match(dst.name)[1])], ("before", "after")
        if OLD_DIR.match(dst.name) and parent == self.run_dir:
            return ["prune", self.step], ("before", "after")
        if dst == self.run_dir / "latest":  # (its step: the checkpoint it is about to name)
            return ["latest", int(CKPT.match(Path(src).read_text().strip())[1])], ("partial", "before", "after")
        if dst == self.run_dir / "log.csv":
            return ["log_rewrite", 0], ("partial", "before", "after")
        if dst == self.out:
            return ["lora", self.max_steps + 1], ("partial", "before", "after")
        if self.cache is not None and parent == self.cache:
            return ["cache", 0.5, dst.name], ("partial", "before", "after")
        return None


def install(events: Events, components) -> None:
    """Patch, in this child only, the places where a kill can hit (the real functions still do the work)."""
    from trainer import loop

    real_replace, real_rmtree = os.replace, shutil.rmtree

    def replace(src, dst, *a, **kw):
        what = events.classify(src, dst)
        if what is None:
            return real_replace(src, dst, *a, **kw)
        label, modes = what
        cut = (lambda: os.truncate(src, os.path.getsize(src) // 2)) if os.path.isfile(src) else None
        if "partial" in modes and cut is not None:
            events.hit(label, modes, "partial", cut)
        events.hit(label, modes, "before")
        result = real_replace(src, dst, *a, **kw)
        if "after" in modes:
            events.hit(label, modes, "after")
        return result

    def rmtree(path, *a, **kw):
        p = Path(path)
        if OLD_DIR.match(p.name) and p.parent.absolute() == events.run_dir:
            files = sorted(f for f in p.rglob("*") if f.is_file())
            events.hit(["prune_rm", events.step], ("partial",), "partial",
                       (lambda: files[0].unlink()) if files else None)
        return real_rmtree(path, *a, **kw)

    os.replace, shutil.rmtree = replace, rmtree

    real_train_step, real_row = loop.Run.train_step, loop._Log.row

    def train_step(run):
        events.step, events.forwards = run.step + 1, 0
        return real_train_step(run)

    def row(log_self, **r):
        real_row(log_self, **r)
        events.hit(["log_row", r["step"]], ("after",), "after")

    loop.Run.train_step, loop._Log.row = train_step, row

    def forward(module, args):
        if events.step:
            events.forwards += 1
            events.hit(["forward", events.step, events.forwards], ("at",), "at")

    components[0].model.diffusion_model.register_forward_pre_hook(forward)


def child(request: dict, components) -> int:
    """One training attempt (in the forked child)."""
    from trainer.config import TrainConfig
    from trainer.loop import train

    cfg = TrainConfig(**request["cfg"])
    events = Events(cfg, request.get("kill"), request["progress"])
    install(events, components)

    def on_step(run, row):
        events.step = row["step"]  # (the checkpoint and log events after it belong to this step)
        events.write(request["progress"], json.dumps({"step": row["step"]}) + "\n")

    try:
        result = train(cfg, components=components, on_step=on_step)
    except BaseException:
        events.write(request["progress"], json.dumps({"error": traceback.format_exc()}) + "\n")
        return 1
    events.write(request["progress"], json.dumps({"done": result["status"], "step": result["step"]}) + "\n")
    return 0


def native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def serve(components, replies) -> None:
    for line in sys.stdin:
        request = json.loads(line)
        if native_threads() != 1:  # fork copies only the calling thread: a lock another one held stays held
            raise SystemExit(f"fault_zygote: {native_threads()} threads before fork; run with OMP_NUM_THREADS=1")
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = child(request, components)
            finally:
                os._exit(code)
        timer = (request.get("kill") or {}).get("timer")
        status = wait(pid, None if timer is None else start + timer)
        reply = {"pid": pid, "seconds": time.perf_counter() - start,
                 "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                 "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}
        print(json.dumps(reply), file=replies, flush=True)


def wait(pid: int, deadline: float | None) -> int:
    """The child's wait status; SIGKILL it at ``deadline`` (perf_counter) if it is still running then."""
    while True:
        done, status = os.waitpid(pid, 0 if deadline is None else os.WNOHANG)
        if done:
            return status
        if time.perf_counter() >= deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        time.sleep(0.002)


def main() -> None:
    import logging

    replies = os.fdopen(os.dup(1), "w")  # the protocol; anything else written to stdout goes to stderr
    os.dup2(2, 1)

    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(process)d %(levelname)s %(name)s: %(message)s")
    import kornia  # noqa: F401  (imported once here, not in every child)
    import safetensors.torch  # noqa: F401
    import tqdm.auto  # noqa: F401
    from PIL import Image

    Image.init()
    import trainer.loop  # noqa: F401
    components = fx.tiny_sd15(0)
    print(json.dumps({"ready": True, "threads": native_threads()}), file=replies, flush=True)
    serve(components, replies)


if __name__ == "__main__":
    main()

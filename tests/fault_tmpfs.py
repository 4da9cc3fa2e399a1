"""Test helper (never product code): the CLI trainer running out of disk on a real, size-limited tmpfs.

Run by ``tests/test_trainer_faults.py`` as ``unshare -rm sh -c 'mount -t tmpfs -o size=8m tmpfs DISK &&
exec python tests/fault_tmpfs.py DATA DISK RESULTS'`` (a private mount in a user namespace: no root, and
gone with the process). On DISK: 2 steps with a LoRA at --out; the disk is then filled up to half a
checkpoint; a resume to 4 steps must stop at its first checkpoint with exit status 3 and one clear message,
leaving the LoRA and the checkpoint as they were; once the filler is deleted ("space is freed") a resume
finishes. RESULTS (on the real disk) gets result.json, the final LoRA and log.csv.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trainer_fixtures as fx  # noqa: E402


class Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def digest(folder: Path) -> dict:
    """sha256 of every file under ``folder`` (or of the file ``folder``)."""
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def fill(disk: Path, leave: int) -> Path:
    """A file that leaves about ``leave`` bytes free on ``disk``."""
    filler = disk / "filler.bin"
    size = shutil.disk_usage(disk).free - leave
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, size))
    return filler


def main(data: str, disk: str, results: str) -> None:
    from trainer.checkpoint import latest
    from trainer.distill import main as distill

    disk, results = Path(disk), Path(results)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    messages = Messages()
    logging.getLogger().addHandler(messages)
    args = lambda steps, *more: fx.tiny_args(data, disk, "--max-steps", steps, "--batch-size", 1,  # noqa: E731
                                             "--save-every", 1, *more)
    first = distill(args(2))
    ckpt = latest(disk / "run")
    before = {**digest(disk / "lora.safetensors"), **digest(ckpt)}
    checkpoint_bytes = sum(p.stat().st_size for p in ckpt.iterdir())
    filler = fill(disk, checkpoint_bytes // 2)
    messages.records.clear()
    full = distill(args(4, "--resume", disk / "run"))
    errors = [{"message": r.getMessage(), "traceback": r.exc_info is not None} for r in messages.records]
    after = {**digest(disk / "lora.safetensors"), **digest(ckpt)}
    state = {"latest": latest(disk / "run").name, "temps": sorted(p.name for p in (disk / "run").iterdir()
                                                                 if p.name.startswith("."))}
    filler.unlink()  # space is freed
    resumed = distill(args(4, "--resume", disk / "run"))
    shutil.copy(disk / "lora.safetensors", results / "lora.safetensors")
    shutil.copy(disk / "run" / "log.csv", results / "log.csv")
    (results / "result.json").write_text(json.dumps({
        "first": first, "full": full, "resumed": resumed, "errors": errors, "unchanged": before == after,
        "checkpoint": ckpt.name, "checkpoint_bytes": checkpoint_bytes, **state}))


if __name__ == "__main__":
    main(*sys.argv[1:4])

#!/usr/bin/env python
"""Target-Driven Distillation trainer: ``python trainer/distill.py --teacher model.safetensors
--data DIR --out tdd_lora.safetensors [options]``, or ``torchrun --nproc_per_node N trainer/distill.py ...``.

See ``docs/trainer.md``. Programmatic use::

    from trainer.distill import main, train
    from trainer.config import TrainConfig
    train(TrainConfig(data="imgs/", out="x.safetensors", max_steps=10), components=(model, clip, vae))
"""
from __future__ import annotations

import logging
import os
import sys

if __package__ in (None, ""):  # run as a script: import as the package trainer, from the repo root
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]  # no top-level 'data', 'models', ...
    sys.path.insert(0, os.path.dirname(_here))

from trainer.checkpoint import ResumeError  # noqa: E402
from trainer.config import ConfigError, TrainConfig, parse_args  # noqa: E402
from trainer.data import DataError  # noqa: E402
from trainer.fileio import DiskFullError  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.models import TeacherError  # noqa: E402

log = logging.getLogger("trainer")

__all__ = ["main", "train", "TrainConfig"]

USER_ERRORS = (ConfigError, TeacherError, DataError, ResumeError)
#: Exit statuses of :func:`main`.
EXIT_OK, EXIT_USER_ERROR, EXIT_DISK_FULL = 0, 2, 3


def _setup_logging() -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s")


def main(argv=None, components=None) -> int:
    """CLI entry point; returns the exit status: 0 done or cleanly interrupted, 2 bad input, 3 the disk is
    full (the message says which file, the last good checkpoint and how to continue). Each as one message,
    no traceback: the fix is the user's, not the code's."""
    _setup_logging()
    try:
        cfg = parse_args(argv)
        result = train(cfg, components=components)
    except USER_ERRORS as e:
        log.error("%s", e)
        return EXIT_USER_ERROR
    except DiskFullError as e:
        log.error("%s", e)
        return EXIT_DISK_FULL
    log.info("%s at step %d", result["status"], result["step"])
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

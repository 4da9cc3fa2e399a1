"""Checkpoints: everything needed to continue a run exactly, written atomically.

Layout of a run folder::

    run_dir/
      latest                      name of the newest complete checkpoint (replaced atomically)
      checkpoint-000500/
        lora.safetensors          LoRA in fp32, kohya keys
        state.pt                  optimizer, LR scheduler, grad scaler, step, data position, RNG states
        run.json                  config, fingerprint and its fields

A checkpoint folder is built under a temporary name, flushed to disk (fsync) and renamed into place
(``os.replace``); ``latest`` is replaced the same way after it. So a kill -9, a crash or SIGTERM at any
moment never leaves a half checkpoint that ``--resume`` would pick up, and ``latest`` always names a
complete one (docs/trainer.md, "What survives what").
"""
from __future__ import annotations

import io
import json
import logging
import random
import re
from pathlib import Path

import numpy as np
import torch

from .fileio import atomic_path, atomic_write_bytes, atomic_write_text, remove_atomically
from .lora_format import atomic_save_safetensors

log = logging.getLogger(__name__)


class ResumeError(ValueError):
    """``--resume`` points at something that can't continue this run."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d{6,})$")
FILES = ("lora.safetensors", "state.pt", "run.json")


def save(run_dir, step: int, lora_sd: dict, state: dict, run_info: dict, keep: int = 2) -> Path:
    """Write ``checkpoint-<step>`` and point ``latest`` at it; keep the newest ``keep`` checkpoints up to
    ``step``. Kill-safe in every order of events: the folder is complete before it gets its name, ``latest``
    only ever names a complete folder, and folders are removed by renaming them away first."""
    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{step:06d}"
    if _fingerprint_of(final) == run_info["fingerprint"]:
        # this run's own checkpoint of this step (a resume at its last step, a host's cancel right after a
        # save): the state is the same, and replacing the folder would leave ``latest`` naming nothing
        log.debug("checkpoint %s of this run is already on disk", final)
    else:
        with atomic_path(final) as tmp:
            tmp.mkdir()
            atomic_save_safetensors(lora_sd, tmp / "lora.safetensors")
            buf = io.BytesIO()
            torch.save(state, buf)
            atomic_write_bytes(tmp / "state.pt", buf.getvalue())
            atomic_write_text(tmp / "run.json", json.dumps(run_info, indent=2, sort_keys=True, default=str))
            if final.exists():  # another run's checkpoint of this step: os.replace can't overwrite a folder
                _unlink_latest_if(run_dir, final, run_info["fingerprint"])
                remove_atomically(final)
    atomic_write_text(run_dir / "latest", final.name)
    _prune(run_dir, step, keep)
    log.info("saved checkpoint %s", final)
    return final


def checkpoints(run_dir, complete: bool = True) -> dict[int, Path]:
    """Step -> folder, for the ``checkpoint-NNNNNN`` folders of ``run_dir`` (``complete``: those with all
    their files; a folder this version writes always is, one half-removed by an older version may not be)."""
    out = {}
    for p in Path(run_dir).glob("checkpoint-*"):
        m = CHECKPOINT_NAME.match(p.name)
        if m and p.is_dir() and (not complete or all((p / f).is_file() for f in FILES)):
            out[int(m[1])] = p
    return out


def latest(run_dir) -> Path | None:
    """The checkpoint ``run_dir/latest`` names, or None (no checkpoint yet, or it is missing)."""
    pointer = Path(run_dir) / "latest"
    if not pointer.is_file():
        return None
    p = Path(run_dir) / pointer.read_text().strip()
    return p if CHECKPOINT_NAME.match(p.name) and p.is_dir() else None


def _fingerprint_of(ckpt: Path) -> str | None:
    if not all((ckpt / f).is_file() for f in FILES):
        return None
    try:
        return json.loads((ckpt / "run.json").read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None


def _unlink_latest_if(run_dir: Path, stale: Path, fingerprint: str) -> None:
    """Before another run's ``stale`` folder is replaced: if ``latest`` names it, point ``latest`` at this
    run's newest checkpoint instead (or remove it when there is none), so it never names a missing folder."""
    if latest(run_dir) != stale:
        return
    own = [p for s, p in sorted(checkpoints(run_dir).items()) if p != stale and _fingerprint_of(p) == fingerprint]
    if own:
        atomic_write_text(run_dir / "latest", own[-1].name)
    else:
        (run_dir / "latest").unlink()


def _prune(run_dir: Path, step: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step``; later ones belong to a trajectory this run has
    replaced (a fresh run in an old run's folder, a resume from an earlier checkpoint) and go too."""
    kept = sorted(s for s in checkpoints(run_dir) if s <= step)[-keep:]
    for s, p in checkpoints(run_dir, complete=False).items():
        if s not in kept:
            remove_atomically(p)


def resolve(path) -> Path:
    """A checkpoint folder from a run folder (its ``latest``) or a checkpoint folder itself."""
    p = Path(path)
    if not p.exists():
        raise ResumeError(f"--resume {p}: no such folder; pass the run folder of an earlier run "
                          "(or one of its checkpoint-NNNNNN folders)")
    if (p / "latest").is_file():
        named = (p / "latest").read_text().strip()
        if not latest(p):
            raise ResumeError(f"--resume {path}: its 'latest' names {named!r}, which is not a checkpoint folder "
                              f"there; pass one of its checkpoint-NNNNNN folders instead")
        p = p / named
    if not all((p / f).is_file() for f in FILES):
        raise ResumeError(f"--resume {path}: not a TDD trainer checkpoint (no run.json/state.pt/lora.safetensors); "
                          "pass the run folder of an earlier run or one of its checkpoint-NNNNNN folders")
    return p


def fingerprint_of(path) -> str | None:
    """The run fingerprint of the checkpoint ``--resume path`` would continue (:func:`resolve`)."""
    return _fingerprint_of(resolve(path))


def load(path, expected_fingerprint: str, expected_fields: dict):
    """-> (checkpoint folder, LoRA state dict, trainer state); clear error on a run mismatch."""
    from safetensors.torch import load_file

    ckpt = resolve(path)
    info = json.loads((ckpt / "run.json").read_text())
    if info.get("fingerprint") != expected_fingerprint:
        old = info.get("fingerprint_fields", {})
        if bool(old.get("adversarial")) != bool(expected_fields.get("adversarial")):
            was = "with" if old.get("adversarial") else "without"
            raise ResumeError(f"--resume {path} was trained {was} --adversarial; a run can't switch the adversarial "
                              f"variant on or off: resume it {was} --adversarial, or start a fresh run (drop --resume, "
                              "or use a new --run-dir)")
        diffs = [f"{k}: checkpoint {old.get(k)!r} vs now {expected_fields.get(k)!r}"
                 for k in sorted(set(expected_fields) | set(old)) if old.get(k) != expected_fields.get(k)]
        what = "a different base model (teacher)" if any(d.startswith("teacher:") for d in diffs) else "different settings"
        raise ResumeError(f"--resume {path} is from another run ({what}): " + "; ".join(diffs or ["fingerprint differs"])
                          + ". Resume with the original teacher and settings, or start a fresh run "
                          "(drop --resume, or use a new --run-dir)")
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    return ckpt, load_file(str(ckpt / "lora.safetensors")), state

"""Checkpoints: everything needed to continue a run exactly, written atomically.

Layout of a run folder::

    run_dir/
      latest                      name of the newest complete checkpoint (replaced atomically)
      checkpoint-000500/
        lora.safetensors          LoRA in fp32, kohya keys
        state.pt                  optimizer, LR scheduler, grad scaler, step, data position, RNG states
        run.json                  config, fingerprint and its fields

A checkpoint folder is built under a temporary name and renamed into place (``os.replace``), so a
crash or SIGTERM mid-write never leaves a half checkpoint that ``--resume`` would pick up.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .fileio import atomic_path, atomic_write_text
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


def save(run_dir, step: int, lora_sd: dict, state: dict, run_info: dict, keep: int = 2) -> Path:
    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{step:06d}"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        atomic_save_safetensors(lora_sd, tmp / "lora.safetensors")
        torch.save(state, tmp / "state.pt")
        atomic_write_text(tmp / "run.json", json.dumps(run_info, indent=2, sort_keys=True, default=str))
        if final.exists():  # os.replace can't overwrite a non-empty folder
            shutil.rmtree(final)
    atomic_write_text(run_dir / "latest", final.name)
    ckpts = sorted(p for p in run_dir.glob("checkpoint-*") if p.is_dir())
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("saved checkpoint %s", final)
    return final


def resolve(path) -> Path:
    """A checkpoint folder from a run folder (its ``latest``) or a checkpoint folder itself."""
    p = Path(path)
    if not p.exists():
        raise ResumeError(f"--resume {p}: no such folder; pass the run folder of an earlier run "
                          "(or one of its checkpoint-NNNNNN folders)")
    if (p / "latest").is_file():
        p = p / (p / "latest").read_text().strip()
    if not (p / "run.json").is_file() or not (p / "state.pt").is_file() or not (p / "lora.safetensors").is_file():
        raise ResumeError(f"--resume {path}: not a TDD trainer checkpoint (no run.json/state.pt/lora.safetensors); "
                          "pass the run folder of an earlier run or one of its checkpoint-NNNNNN folders")
    return p


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

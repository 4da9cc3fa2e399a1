"""Fixtures for the trainer tests: the tiny host-class model, procedural PNG datasets, configs.

Also usable as a ``--teacher`` factory in subprocesses: ``--teacher tests/trainer_fixtures.py:tiny_sd15``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from trainer.models import ensure_host  # noqa: E402

TINY_PY = REPO / "tests" / "tdd_test_nodes" / "tiny.py"
RESOLUTION = 64  # tiny VAE: 64 px -> 8x8 latent


def tiny_module():
    """``tests/tdd_test_nodes/tiny.py`` loaded by path (its package __init__ registers ComfyUI nodes)."""
    ensure_host("cpu")
    name = "tdd_trainer_tiny"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TINY_PY)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def tiny_sd15(seed: int | None = None):
    """(ModelPatcher, CLIP, VAE) of the tiny random-weight SD1.5 model (seed from $TDD_TINY_SEED, default 0)."""
    if seed is None:
        seed = int(os.environ.get("TDD_TINY_SEED", "0"))
    return tiny_module().build_tiny_sd15(seed)


def make_images(folder, n: int = 4, size=(80, 64), captions: bool = True, seed: int = 0, jsonl: bool = False) -> Path:
    """``n`` procedural PNGs (gradients + a coloured square) with .txt captions (or a data.jsonl)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    recs = []
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    for i in range(n):
        w, h = size
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, 40 * i % 255)], -1)
        c = rng.integers(0, 255, 3)
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        img[y0:y0 + h // 3, x0:x0 + w // 3] = c
        name = f"img_{i:03d}.png"
        Image.fromarray(img.astype(np.uint8)).save(folder / name)
        caption = f"a {colours[i % len(colours)]} square on a gradient"
        if captions and not jsonl:
            (folder / name).with_suffix(".txt").write_text(caption)
        recs.append({"path": name, "caption": caption})
    if jsonl:
        with open(folder / "data.jsonl", "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
        return folder / "data.jsonl"
    return folder


def tiny_args(data, tmp, *extra) -> list[str]:
    """CLI arguments for a fast tiny run (rank 4, 64 px, 2 steps)."""
    tmp = Path(tmp)
    return ["--teacher", f"{REPO / 'tests' / 'trainer_fixtures.py'}:tiny_sd15", "--data", str(data),
            "--out", str(tmp / "lora.safetensors"), "--run-dir", str(tmp / "run"), "--resolution", str(RESOLUTION),
            "--rank", "4", "--alpha", "2", "--lr", "1e-3", "--max-steps", "2", "--batch-size", "2",
            "--device", "cpu", "--no-progress", "--num-workers", "0", *map(str, extra)]

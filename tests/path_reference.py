"""The LoRA that a fixed short run makes, as a table of per-tensor fingerprints.

``tests/data/path_reference.json`` was written by this script on main *before* the generic teacher
seam replaced the per-family Teacher classes (issue 26): it is what the old path made. The test
``tests/test_families.py::test_generic_path_gives_the_old_path_lora`` trains the same runs with the
current path and compares tensor by tensor (bit for bit where the sha256 matches, else to float
tolerance through the stored sums and norms).

Run: ``python tests/path_reference.py OUT.json`` (CPU, one thread; about a minute).
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trainer_fixtures as fx  # noqa: E402

REPO = fx.REPO
#: name -> (teacher factory spec, resolution): the demo teacher, the tiny SD1.5/SD2.x-v/SDXL, the reduced FLUX.1.
RUNS = {
    "demo": (f"{REPO / 'nodes' / 'demo_model.py'}:load_demo", 64),
    "sd15": (f"{REPO / 'tests' / 'trainer_fixtures.py'}:tiny_sd15", 64),
    "sd2v": (f"{REPO / 'tests' / 'trainer_fixtures.py'}:tiny_sd2v", 64),
    "sdxl": (f"{REPO / 'tests' / 'trainer_fixtures.py'}:tiny_sdxl", 64),
    "flux": (f"{REPO / 'tests' / 'flux_fixtures.py'}:tiny_flux", 32),
}


def fingerprint(sd: dict) -> dict:
    """Per tensor: sha256 of its bytes, shape, dtype, float64 sum and L2 norm."""
    out = {}
    for k in sorted(sd):
        v = sd[k].contiguous()
        out[k] = {"sha256": hashlib.sha256(v.cpu().numpy().tobytes()).hexdigest(), "shape": list(v.shape),
                  "dtype": str(v.dtype), "sum": float(v.double().sum()), "norm": float(v.double().norm())}
    return out


def run_one(name: str, tmp: Path) -> dict:
    """Train ``name``'s teacher 3 steps (batch 2, rank 4, seed 0, no calibration) -> the LoRA's fingerprint."""
    from trainer.loop import train

    fx.ensure_host("cpu")
    import comfy.model_management
    # On ComfyUI 0.33 the old path could not train FLUX (the host's fused rope kernel has no backward
    # outside the host's training mode), so the reference was recorded with that mode on, as the host's
    # own trainer (comfy_extras/nodes_train.py) sets it and the generic seam does.
    comfy.model_management.in_training = True
    spec, res = RUNS[name]
    data = fx.make_images(tmp / "data", n=4, size=(res + 16, res))
    cfg = fx.train_config(data, tmp / "run", teacher=spec, resolution=res, max_steps=3)
    result = train(cfg)
    assert result["status"] == "done", result
    return fingerprint(fx.lora_tensors(result["out"]))


def main(out: str, names=None) -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    table = {}
    for name in names or RUNS:
        with tempfile.TemporaryDirectory() as d:
            table[name] = run_one(name, Path(d))
    Path(out).write_text(json.dumps(table, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or None)

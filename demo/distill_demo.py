"""Distil the demo teacher into its TDD LoRA with this pack's own trainer.

    .venv/bin/python demo/distill_demo.py [--images 4000] [trainer flags, e.g. --max-steps 200]

Writes the procedural dataset (demo/dataset.py, seed 0) as PNG + .txt captions, then runs
``trainer/distill.py --config demo/distill_demo.toml`` into demo/loras/demo_tdd_lora.safetensors.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from demo import dataset  # noqa: E402
from trainer import distill  # noqa: E402

log = logging.getLogger("demo.distill")


def write_dataset(folder: Path, n: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        png = folder / f"{i:06d}.png"
        if png.exists():
            continue
        img, caption, _ = dataset.sample(seed, i)
        Image.fromarray(img).save(png)
        png.with_suffix(".txt").write_text(caption)
    return folder


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--data", default=str(REPO / ".host" / "demo_data"))
    args, trainer_args = ap.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data = write_dataset(Path(args.data), args.images)
    out = REPO / "demo" / "loras" / "demo_tdd_lora.safetensors"
    out.parent.mkdir(exist_ok=True)
    return distill.main(["--config", str(REPO / "demo" / "distill_demo.toml"), "--data", str(data), "--out", str(out),
                         "--run-dir", str(REPO / ".host" / "demo_distill_run"), "--cache-dir",
                         str(REPO / ".host" / "demo_cache"),
                         "--overwrite",  # this script's job: rebuild the shipped LoRA
                         *trainer_args])


if __name__ == "__main__":
    sys.exit(main())

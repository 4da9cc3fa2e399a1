#!/usr/bin/env python
"""Trainer benchmark, side by side in one run: (1) the adversarial variant's step (docs/method.md §5.2)
against the plain TDD step, and (2) training throughput with the posterior cache (--cache-dir) against
encoding every image with the VAE at every step.

    .venv/bin/python bench/bench_trainer_variants.py [--teacher tests/trainer_fixtures.py:tiny_sd15]
        [--steps 4] [--batch 4] [--resolution 64] [--image-size 96x80] [--images 8]

Each side is a real trainer run (trainer.loop.Run: data, draws, conditioning, optimiser step) on its own
copy of the teacher; steps of the two sides alternate, so machine load hits both alike. The adversarial
side alternates discriminator steps (even) and student steps (odd); both are reported.

What to expect (units of one UNet forward): a plain TDD step is ~6 (teacher cond+uncond at 2x batch 2,
no-grad target 1, student forward+backward 3). The adversarial student step adds the discriminator's
encoder on the re-noised fake with gradients to the student (~1 forward + its backward, ~2-3, the
encoder is about half the UNet), the discriminator step the encoder on fake and real without student
gradients (~1-1.5): about 1.3-1.5x and 1.2x. The cache saves the VAE encoder per sample, which on
SD-sized VAEs costs about as much as a UNet forward at the same resolution.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from bench_trainer import sync  # noqa: E402  (this folder is on sys.path when run as a script)
from trainer import models  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.loop import Dist, Run  # noqa: E402

log = logging.getLogger("bench_trainer_variants")


def write_images(folder: Path, n: int, width: int, height: int) -> Path:
    """``n`` seeded noise-and-gradient PNGs with captions."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(f"image number {i}")
    return folder


def make_run(args, tmp: Path, name: str, **overrides) -> Run:
    """A ready trainer run (setup + resume stages) on a fresh copy of the teacher."""
    cfg = TrainConfig(teacher=args.teacher, data=str(tmp / "data"), out=str(tmp / f"{name}.safetensors"),
                      run_dir=str(tmp / name), resolution=args.resolution, rank=args.rank, alpha=8.0, lr=1e-5,
                      max_steps=10 ** 6, batch_size=args.batch, device=args.device, progress=False, num_workers=0,
                      save_every=10 ** 6, calibrate=False, **overrides)
    cfg.validate()
    ddp = Dist(cfg.device)
    cfg.world_size = ddp.world
    cfg.resolve_accumulation()
    teacher = models.load_teacher(args.teacher, device=str(ddp.device))
    run = Run(cfg, teacher, ddp)
    run.resume()  # fills the cache when there is one
    return run


def alternate(runs: dict[str, Run], steps: int) -> dict[str, list[float]]:
    """Seconds per optimizer step of each run, the runs' steps interleaved; one warm-up step each (two for
    the adversarial run, so both of its step kinds are warm)."""
    for run in runs.values():
        for _ in range(2):
            run.train_step()
    times = {name: [] for name in runs}
    for _ in range(steps):
        for name, run in runs.items():
            sync(run.device)
            t0 = time.perf_counter()
            run.train_step()
            sync(run.device)
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=os.path.join(REPO, "tests", "trainer_fixtures.py") + ":tiny_sd15")
    p.add_argument("--steps", type=int, default=4, help="timed steps per run (even: as many d as student steps)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--image-size", default="96x80", help="WxH of the generated training images")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    # only this bench's lines: not the host's load messages or the trainer's lr x samples warning
    logging.basicConfig(stream=sys.stdout, format="%(message)s", level=logging.ERROR, force=True)
    log.setLevel(logging.INFO)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    steps = args.steps + args.steps % 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_images(tmp / "data", args.images, width, height)
        runs = {"tdd": make_run(args, tmp, "tdd", cache_dir=str(tmp / "cache")),
                "tdd-adv": make_run(args, tmp, "adv", cache_dir=str(tmp / "cache"), adversarial=True),
                "encode every step": make_run(args, tmp, "enc")}
        try:
            times = alternate(runs, steps)
        finally:
            for run in runs.values():
                run.close()
    plain = statistics.median(times["tdd"])
    adv = times["tdd-adv"]
    d_steps, g_steps = adv[0::2], adv[1::2]  # timed steps start at step 2: even = discriminator
    log.info("device %s, batch %d at %d px (images %dx%d), LoRA rank %d, %d timed steps each (median)",
             runs["tdd"].device, args.batch, args.resolution, width, height, args.rank, steps)
    log.info("plain TDD step (posterior cache)   %8.3f s   %7.2f samples/s", plain, args.batch / plain)
    log.info("adversarial discriminator step     %8.3f s   %.2fx the plain step", statistics.median(d_steps),
             statistics.median(d_steps) / plain)
    log.info("adversarial student step           %8.3f s   %.2fx the plain step", statistics.median(g_steps),
             statistics.median(g_steps) / plain)
    log.info("adversarial, mean of both kinds    %8.3f s   %.2fx the plain step", statistics.mean(adv),
             statistics.mean(adv) / statistics.mean(times["tdd"]))
    enc = statistics.median(times["encode every step"])
    log.info("plain TDD step, VAE encode per step %7.3f s   %7.2f samples/s: the cache gives %.2fx the throughput",
             enc, args.batch / enc, enc / plain)
    return times


if __name__ == "__main__":
    main()

"""How much training moves a LoRA: the student's 4-step output change vs learning rate x samples, on the
demo model (nodes/demo_model.py, its committed teacher weights). The trainer's start-up warning
(trainer/guards.py) takes its threshold from this measurement (numbers in docs/trainer.md).

    .venv/bin/python bench/lora_movement.py [--runs 1e-5:25 1e-4:25 ...] [--batch 8] [--images 64]

Each run trains a fresh LoRA (rank 16, alpha 2, the demo's) for STEPS steps at LR with batch BATCH, then
samples the student with 4 TDD steps (eta 0.2, guidance 1) for fixed prompts and seeds and reports the
mean absolute change of the decoded images against the teacher's own 4-step output (pixels in [0, 1]).
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.config import TrainConfig  # noqa: E402
from trainer.fileio import load_module  # noqa: E402
from trainer.lora import LoRANetwork  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.models import ensure_host, from_components  # noqa: E402

PROMPTS = ["a red circle on a blue background", "a yellow square on a green background"]
RANK, ALPHA, RESOLUTION = 16, 2.0, 64


def four_step_images(teacher, network, conds, latent_shape, seeds=(0, 1)) -> torch.Tensor:
    from trainer.validation import sample_images

    network.enabled = True
    return torch.stack([sample_images(teacher, c, (1, *latent_shape), 4, seed)[0] for c in conds for seed in seeds])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", default=["1e-5:10", "1e-4:10", "1e-3:10", "1e-2:10", "1e-3:40"],
                    help="LR:STEPS pairs")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--images", type=int, default=64)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    ensure_host("cpu")
    demo_model = load_module(REPO / "nodes" / "demo_model.py", "tdd_demo_model_bench")
    from demo.distill_demo import write_dataset

    components = demo_model.load_demo()[:3]
    teacher = from_components(*components)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_dataset(tmp / "data", args.images)
        ctx, pooled = teacher.encode_text(PROMPTS)
        conds = [teacher.make_cond(ctx[i:i + 1], None, RESOLUTION, RESOLUTION) for i in range(len(PROMPTS))]
        latent_shape = (4, RESOLUTION // 8, RESOLUTION // 8)
        base_net = LoRANetwork(teacher.lora_targets(), RANK, ALPHA).attach()
        base = four_step_images(teacher, base_net, conds, latent_shape)  # LoRA up = 0: the teacher itself
        base_net.detach_hooks()
        print(f"{'lr':>8} {'steps':>6} {'samples':>8} {'lr x samples':>13} {'mean |d pixel|':>15} {'max':>7} {'s':>6}")
        for run in args.runs:
            lr, steps = float(run.split(":")[0]), int(run.split(":")[1])
            t0 = time.perf_counter()
            cfg = TrainConfig(teacher="<demo>", data=str(data), out=str(tmp / f"l_{run}.safetensors"),
                              run_dir=str(tmp / f"run_{run}"), resolution=RESOLUTION, rank=RANK, alpha=ALPHA, lr=lr,
                              max_steps=steps, batch_size=args.batch, device="cpu", progress=False, num_workers=0,
                              cache_dir=str(tmp / "cache"), save_every=10 ** 6, calibrate=False)
            r = train(cfg, components=teacher)
            if r["status"] != "done":
                raise SystemExit(f"run {run} was {r['status']} at step {r['step']}")
            from safetensors.torch import load_file
            net = LoRANetwork(teacher.lora_targets(), RANK, ALPHA)
            net.load_kohya_state_dict({k: v.float() for k, v in load_file(r["out"]).items()})
            net.attach()
            imgs = four_step_images(teacher, net, conds, latent_shape)
            net.detach_hooks()
            d = (imgs - base).abs()
            samples = steps * args.batch
            print(f"{lr:8.0e} {steps:6d} {samples:8d} {lr * samples:13.2e} {float(d.mean()):15.5f} "
                  f"{float(d.max()):7.3f} {time.perf_counter() - t0:6.0f}", flush=True)


if __name__ == "__main__":
    main()

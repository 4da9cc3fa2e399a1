#!/usr/bin/env python
"""Trainer benchmark: samples/s and peak memory of a training step for --method tdd vs lcm, and the
cost of one training step relative to one plain teacher forward+backward, measured side by side.

    .venv/bin/python bench/bench_trainer.py [--batch 4] [--steps 8] [--teacher tests/trainer_fixtures.py:tiny_sd15]

Default model: the tiny random-weight SD1.5 built from host classes (CPU-friendly). Any --teacher the
trainer accepts works (a real checkpoint on a GPU gives the numbers that matter for production).
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from trainer import models  # noqa: E402
from trainer.algorithm import DiscreteSchedule, StepConfig, TargetSampler, compute_loss, draw_batch  # noqa: E402
from trainer.lora import LoRANetwork  # noqa: E402

log = logging.getLogger("bench_trainer")


class PeakMemory:
    """Peak memory during a block: CUDA allocator peak, or process RSS sampled every 5 ms on CPU."""

    def __init__(self, device):
        self.device, self.peak, self.base, self._stop = device, 0, 0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil
            proc = psutil.Process()
            self.base = proc.memory_info().rss

            def poll():
                while not self._stop.is_set():
                    self.peak = max(self.peak, proc.memory_info().rss)
                    time.sleep(0.005)
            self._t = threading.Thread(target=poll, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._t.join()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=os.path.join(REPO, "tests", "trainer_fixtures.py") + ":tiny_sd15")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--resolution", type=int, default=64, help="pixels (latent = resolution / 8)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    logging.getLogger().setLevel(logging.ERROR)  # the host's load messages

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    teacher = models.load_teacher(args.teacher, device=str(device)).to(device)
    network = LoRANetwork(teacher.lora_targets(), args.rank, 8.0).to(device).attach()
    params = list(network.parameters())
    opt = torch.optim.AdamW(params, lr=1e-6)
    sched = DiscreteSchedule(teacher.sigmas)
    gen = torch.Generator().manual_seed(0)
    lat = args.resolution // 8
    x0 = torch.randn(args.batch, 4, lat, lat, generator=gen).to(device)
    ctx, pooled = teacher.encode_text(["a photo of a cat"] * args.batch)
    cond = teacher.make_cond(ctx, pooled, args.resolution, args.resolution)
    e_ctx, e_pooled = teacher.encode_text([""])
    u = teacher.uncond(e_ctx, e_pooled, args.resolution, args.resolution)
    uncond = type(u)(u.context.expand(args.batch, -1, -1), None if u.y is None else u.y.expand(args.batch, -1))

    def student(z, t, c):
        return teacher.x0(z, t, c)

    def frozen(z, t, c):
        with network.disabled():
            return teacher.x0(z, t, c)

    def train_step(method, k):
        draws = draw_batch(TargetSampler(method), 0, range(k * args.batch, (k + 1) * args.batch), x0.shape[1:], 0.2)
        loss = compute_loss(student, frozen, x0, cond, uncond, draws, sched, StepConfig(method=method))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def plain_step(k):
        """One teacher(+LoRA) forward and backward on the same batch: the unit of cost."""
        draws = draw_batch(TargetSampler("tdd"), 0, range(k * args.batch, (k + 1) * args.batch), x0.shape[1:], 0.2)
        a, s = sched.coeffs(draws.t, x0)
        z = a * x0 + s * draws.noise.to(device)
        out = student(z, draws.t.to(device), cond)
        ((out - x0) ** 2).mean().backward()
        opt.zero_grad(set_to_none=True)

    def timed(fn, *a):
        sync(device)
        t0 = time.perf_counter()
        fn(*a)
        sync(device)
        return time.perf_counter() - t0

    for m in ("tdd", "lcm"):  # warm-up
        train_step(m, 0)
    plain_step(0)

    results = {}
    for method in ("tdd", "lcm"):
        with PeakMemory(device) as mem:
            times = [timed(train_step, method, k) for k in range(1, args.steps + 1)]
        results[method] = (args.batch / statistics.median(times), mem.peak, mem.peak - mem.base)

    # side by side: alternate training steps and plain forward+backward steps
    ratios = []
    for k in range(1, args.steps + 1):
        t_train = timed(train_step, "tdd", k)
        t_plain = timed(plain_step, k)
        ratios.append(t_train / t_plain)

    log.info("device %s, teacher %s (%s), batch %d, %dx%d latent, LoRA rank %d, %d LoRA modules",
             device, teacher.name, teacher.arch, args.batch, lat, lat, args.rank, len(network.prefixes))
    what = "CUDA allocated" if device.type == "cuda" else "process RSS"
    for method, (sps, peak, grow) in results.items():
        log.info("  --method %-3s  %8.2f samples/s   peak %s %8.1f MiB (+%.1f MiB during the steps)",
                 method, sps, what, peak / 2 ** 20, grow / 2 ** 20)
    log.info("  training step / plain teacher forward+backward = %.2f (median of %d, min %.2f, max %.2f)",
             statistics.median(ratios), len(ratios), min(ratios), max(ratios))
    log.info("  (a step = 1 batched cond+uncond teacher forward at 2x batch + 1 no-grad student target forward "
             "+ 1 student forward+backward)")
    return results, statistics.median(ratios)


if __name__ == "__main__":
    main()

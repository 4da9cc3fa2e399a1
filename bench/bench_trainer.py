#!/usr/bin/env python
"""Trainer benchmark: samples/s and peak memory of a training step for --method tdd vs lcm, and the
cost of one training step relative to one plain teacher forward+backward, measured side by side, for
an SD-family teacher and a FLUX.1 (flow-matching) teacher in the same run; then the trainer step
through the generic seam (trainer/families/) against the per-family Teachers it replaced (``--old-rev``,
loaded from git), alternating step by step on two copies of the same model.

    .venv/bin/python bench/bench_trainer.py [--batch 4] [--steps 8] [--teacher tests/trainer_fixtures.py:tiny_sd15]
        [--flux-teacher tests/flux_fixtures.py:tiny_flux | --flux-teacher none]

Default models: the tiny random-weight SD1.5 and the reduced FLUX.1 (2 double + 2 single blocks, width
64), both built from host classes (CPU-friendly). Any --teacher the trainer accepts works (a real
checkpoint on a GPU gives the numbers that matter for production).

What a step costs, in units of one forward pass (a plain forward+backward is about 3 units):
- SD family (docs/method.md §5.5): the teacher's cond+uncond pass at 2x batch (2) + the no-grad student
  target (1) + the student forward+backward (3) = 6 units, about 2x a plain forward+backward;
- FLUX (docs/method.md §5.1): one teacher pass, no CFG (1) + the target (1) + the student (3) = 5 units,
  about 5/3 = 1.67x.
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
from trainer.families import host_training  # noqa: E402
from trainer.algorithm import StepConfig, TargetSampler, compute_loss, draw_batch  # noqa: E402
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


class Stepper:
    """One teacher's training step and plain forward+backward on a fixed batch (its own LoRA)."""

    def __init__(self, teacher, args, device):
        self.teacher, self.args, self.device = teacher, args, device
        self.network = network = LoRANetwork(teacher.lora_targets(), args.rank, 8.0).to(device).attach()
        self.params = list(network.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=1e-6)
        self.sched = teacher.schedule()  # the family's noise levels and teacher step
        gen = torch.Generator().manual_seed(0)
        lat, channels = args.resolution // 8, teacher.model.latent_format.latent_channels
        self.x0 = torch.randn(args.batch, channels, lat, lat, generator=gen).to(device)
        ctx, pooled = teacher.encode_text(["a photo of a cat"] * args.batch)
        self.cond = teacher.make_cond(ctx, pooled, args.resolution, args.resolution)
        e_ctx, e_pooled = teacher.encode_text([""])
        u = teacher.uncond(e_ctx, e_pooled, args.resolution, args.resolution)
        self.uncond = type(u)(u.context.expand(args.batch, -1, -1), None if u.y is None else u.y.expand(args.batch, -1),
                              None if u.guidance is None else u.guidance.expand(args.batch))
        self.loss_kind = "l2" if teacher.arch == "flux" else "huber"

    def student(self, z, t, c):
        return self.teacher.x0(z, t, c)

    def frozen(self, z, t, c):
        with self.network.disabled():
            return self.teacher.x0(z, t, c)

    def draws(self, k, method="tdd"):
        b = self.args.batch
        return draw_batch(TargetSampler(method), 0, range(k * b, (k + 1) * b), self.x0.shape[1:], 0.2)

    def train_step(self, method, k):
        step_cfg = StepConfig(method=method, loss=self.loss_kind)
        loss = compute_loss(self.student, self.frozen, self.x0, self.cond, self.uncond, self.draws(k, method),
                            self.sched, step_cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def plain_step(self, k):
        """One teacher(+LoRA) forward and backward on the same batch: the unit of cost."""
        d = self.draws(k)
        z = self.sched.noised(self.x0, d.noise.to(self.device), d.t.to(self.device))
        out = self.student(z, d.t.to(self.device), self.cond)
        ((out - self.x0) ** 2).mean().backward()
        self.opt.zero_grad(set_to_none=True)


def timed(device, fn, *a):
    sync(device)
    t0 = time.perf_counter()
    fn(*a)
    sync(device)
    return time.perf_counter() - t0


def bench_teacher(teacher, args, device, methods) -> tuple[dict, list[float], int]:
    """Time ``methods``' training steps and the plain forward+backward on one teacher.
    -> ({method: (samples/s, peak bytes, growth bytes)}, training-step / plain-step ratios, LoRA modules)."""
    st = Stepper(teacher, args, device)
    try:
        for m in methods:  # warm-up
            st.train_step(m, 0)
        st.plain_step(0)
        results = {}
        for method in methods:
            with PeakMemory(device) as mem:
                times = [timed(device, st.train_step, method, k) for k in range(1, args.steps + 1)]
            results[method] = (args.batch / statistics.median(times), mem.peak, mem.peak - mem.base)
        # side by side: alternate training steps and plain forward+backward steps
        ratios = []
        for k in range(1, args.steps + 1):
            t_train = timed(device, st.train_step, "tdd", k)
            t_plain = timed(device, st.plain_step, k)
            ratios.append(t_train / t_plain)
    finally:
        st.network.detach_hooks()
    return results, ratios, len(st.network.prefixes)


def old_seam(rev: str):
    """``trainer/models.py`` as it was at git revision ``rev`` (the per-family Teachers before the generic
    seam of issue 26), loaded as a module of this trainer package, for the side-by-side comparison."""
    import importlib.util
    import subprocess

    src = subprocess.run(["git", "-C", REPO, "show", f"{rev}:trainer/models.py"], capture_output=True, text=True,
                         check=True).stdout
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("trainer._old_models", loader=None))
    module.__package__ = "trainer"
    module.__file__ = os.path.join(REPO, "trainer", "models.py")  # (it locates the repository from its path)
    exec(compile(src, f"{rev}:trainer/models.py", "exec"), module.__dict__)
    return module


def compare_paths(spec, args, device, rev) -> list[float]:
    """The trainer step through the generic seam and through ``rev``'s per-family Teacher, each on its own
    copy of the same model, alternating step by step -> per-step time ratios new / old."""
    from trainer.families import host_training

    factory = models._load_factory(spec)
    old = old_seam(rev)
    new_t = models.Teacher(*factory()[:3], name="new").to(device)
    old_t = old.Teacher(*factory()[:3], name="old").to(device)
    new_s, old_s = Stepper(new_t, args, device), Stepper(old_t, args, device)
    ratios = []
    try:
        with host_training():  # both in the host's training mode (the old path needs it on 0.33 to backward)
            new_s.train_step("tdd", 0)
            old_s.train_step("tdd", 0)
            for k in range(1, args.steps + 1):
                t_new = timed(device, new_s.train_step, "tdd", k)
                t_old = timed(device, old_s.train_step, "tdd", k)
                ratios.append(t_new / t_old)
    finally:
        new_s.network.detach_hooks()
        old_s.network.detach_hooks()
    return ratios


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=os.path.join(REPO, "tests", "trainer_fixtures.py") + ":tiny_sd15",
                   help="SD-family teacher (default: the tiny SD1.5)")
    p.add_argument("--flux-teacher", default=os.path.join(REPO, "tests", "flux_fixtures.py") + ":tiny_flux",
                   help="FLUX teacher (default: the reduced FLUX.1), or 'none' to skip it")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--resolution", type=int, default=64, help="pixels (latent = resolution / 8)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--old-rev", default="22c5fa8",
                   help="git revision of the per-family Teachers to time side by side with the generic seam "
                        "(issue 26; 'none' to skip)")
    args = p.parse_args(argv)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    logging.getLogger().setLevel(logging.ERROR)  # the host's load messages

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    runs = [(args.teacher, ("tdd", "lcm"))]  # FLUX: lcm's boundary conditions are the discrete schedule's only
    if args.flux_teacher.lower() != "none":
        runs.append((args.flux_teacher, ("tdd",)))
    rows = []
    for spec, methods in runs:
        teacher = models.load_teacher(spec, device=str(device)).to(device)
        with host_training():
            results, ratios, modules = bench_teacher(teacher, args, device, methods)
        rows.append((teacher, results, ratios, modules))
    what = "CUDA allocated" if device.type == "cuda" else "process RSS"
    lat = args.resolution // 8
    log.info("device %s, batch %d, %dx%d latent, LoRA rank %d", device, args.batch, lat, lat, args.rank)
    expected = {"flux": "1 teacher pass, no CFG + 1 no-grad target + 1 student fwd+bwd: ~5/3 = 1.67x",
                "sd": "1 cond+uncond teacher pass at 2x batch + 1 no-grad target + 1 student fwd+bwd: ~2x"}
    summary = {}
    for teacher, results, ratios, modules in rows:
        log.info("%s: %s (%d LoRA modules)", teacher.arch, teacher.name, modules)
        for method, (sps, peak, grow) in results.items():
            log.info("  --method %-3s  %8.2f samples/s   peak %s %8.1f MiB (+%.1f MiB during the steps)",
                     method, sps, what, peak / 2 ** 20, grow / 2 ** 20)
        log.info("  training step / plain forward+backward = %.2f (median of %d, min %.2f, max %.2f; expected %s)",
                 statistics.median(ratios), len(ratios), min(ratios), max(ratios),
                 expected["flux" if teacher.arch == "flux" else "sd"])
        summary[teacher.arch] = (results, statistics.median(ratios))
    if len(rows) == 2:
        (sd_arch, (_, sd_ratio)), (_, (_, flux_ratio)) = summary.items()
        log.info("side by side: step cost %s %.2fx vs flux %.2fx a plain forward+backward (flux / %s = %.2f)",
                 sd_arch, sd_ratio, flux_ratio, sd_arch, flux_ratio / sd_ratio)
    if args.old_rev.lower() != "none":
        for spec, _ in runs:
            r = compare_paths(spec, args, device, args.old_rev)
            arch = models.load_teacher(spec, device=str(device)).arch
            log.info("%s: generic seam / %s's per-family Teacher, trainer step time = %.3f (median of %d alternating "
                     "steps, min %.3f, max %.3f)", arch, args.old_rev, statistics.median(r), len(r), min(r), max(r))
            summary[f"{arch}_new_over_old"] = statistics.median(r)
    return summary


if __name__ == "__main__":
    main()

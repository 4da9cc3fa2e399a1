"""How strongly each method's training loss sees the student's clean-image (x0) prediction.

    .venv/bin/python bench/target_weight.py [--draws 20000]

The trainer compares the student's prediction and its target at the target timestep ``s``
(trainer/algorithm.py ``prediction_and_target``): TDD and TCD move the x0 prediction at ``t`` to
``s`` by a DDIM jump, ``a_s x0 + s_s (z_t - a_t x0) / s_t``, LCM applies its boundary conditions,
``c_skip z_t + c_out x0``. The factor on x0 (``a_s - s_s a_t / s_t``, resp. ``c_out``) scales every
x0 error in the loss: the pseudo-Huber loss with its tiny ``c`` is about ``|pred - target|``, so an
x0 error ``e`` costs about ``weight * |e|``. This prints that weight over each method's own
timestep draws (the trainer's ``TargetSampler``, SD's 1000-step schedule), overall and by source
timestep, to explain why methods learn image content at different speeds on one budget. Pure
arithmetic: no model, no data.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.algorithm import DiscreteSchedule, TargetSampler, lcm_boundary  # noqa: E402

log = logging.getLogger("bench.target_weight")
BUCKETS = ((0, 250), (250, 500), (500, 750), (750, 1000))


def sd_schedule() -> DiscreteSchedule:
    """SD's ``scaled_linear`` betas (0.00085 to 0.012 over 1000 steps), the demo teacher's schedule."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas)
    return DiscreteSchedule(torch.from_numpy(((1.0 - abar) / abar) ** 0.5))


def x0_weight(method: str, t: torch.Tensor, s: torch.Tensor, sched: DiscreteSchedule) -> torch.Tensor:
    """d(prediction)/d(x0 prediction) of the student's side of the loss, per draw."""
    if method == "lcm":
        return lcm_boundary(t, t.double())[1].double()
    a_t, s_t = sched.coeffs(t, t.double())
    a_s, s_s = sched.coeffs(s, t.double())
    return (a_s - s_s * a_t / s_t).double()


def weights(method: str, n: int, sched: DiscreteSchedule, seed: int = 0, **sampler_kw) -> tuple[np.ndarray, np.ndarray]:
    """(source timesteps, x0 weights) of ``n`` draws of the method's target sampler."""
    sampler, gen = TargetSampler(method, **sampler_kw), torch.Generator().manual_seed(seed)
    draws = [sampler.draw(gen) for _ in range(n)]
    t = torch.tensor([d.t for d in draws])
    s = torch.tensor([d.s for d in draws])
    return t.numpy(), x0_weight(method, t, s, sched).numpy()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=20000)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sched = sd_schedule()
    head = "| method | all t | " + " | ".join(f"t in [{lo}, {hi})" for lo, hi in BUCKETS) + " |"
    lines = [head, "|---|---|" + "---|" * len(BUCKETS)]
    for method, kw in (("tdd", {}), ("tdd", {"eta_max": 0.0}), ("tcd", {}), ("lcm", {})):
        t, w = weights(method, args.draws, sched, **kw)
        cells = [f"{w[(t >= lo) & (t < hi)].mean():.3f}" for lo, hi in BUCKETS]
        name = method + (f" (eta_max {kw['eta_max']})" if kw else "")
        lines.append(f"| {name} | {w.mean():.3f} | " + " | ".join(cells) + " |")
    log.info("mean weight of the x0 prediction in the loss, %d draws per method\n%s", args.draws, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""bench/target_weight.py: the x0 factor of each method's loss, on cases with a closed form."""
from __future__ import annotations

import sys

import numpy as np
import torch

import harness

sys.path.insert(0, str(harness.REPO / "bench"))
import target_weight as tw  # noqa: E402


def test_x0_weight_closed_forms():
    sched = tw.sd_schedule()
    t = torch.tensor([999, 500, 259])
    assert torch.allclose(tw.x0_weight("tdd", t, t, sched), torch.zeros(3, dtype=torch.float64), atol=1e-6)  # s = t
    a_t = sched.sqrt_abar[t].double()
    a_0, s_0 = float(sched.sqrt_abar[0]), float(sched.sqrt_one_minus_abar[0])
    expected = a_0 - s_0 * a_t / sched.sqrt_one_minus_abar[t].double()
    assert torch.allclose(tw.x0_weight("tcd", t, torch.zeros(3, dtype=torch.long), sched), expected, atol=1e-6)
    assert torch.allclose(tw.x0_weight("lcm", t, t, sched), torch.ones(3, dtype=torch.float64), atol=1e-3)


def test_weights_follow_the_target_sampler():
    sched = tw.sd_schedule()
    t, w = tw.weights("tdd", 400, sched)
    assert t.shape == w.shape == (400,) and np.all((w > 0) & (w <= 1))
    _, w0 = tw.weights("tdd", 400, sched, eta_max=0.0)
    assert w0.mean() < w.mean()  # no shrink: targets nearer t, the x0 prediction weighs less
    _, wl = tw.weights("lcm", 400, sched)
    assert np.allclose(wl, 1.0, atol=1e-3)

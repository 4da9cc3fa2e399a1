"""tdd_core against docs/method.md's numbers and closed forms; no ComfyUI involved."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import tdd_core
from tdd_core import (FlowMatching, VarianceExploding, cfg, clip_first_steps, dynamic_threshold, guidance_active,
                      rescale, sample_tdd, schedule_timesteps, solver_grid, target_set, tdd_timesteps)

SPEC_SCHEDULES = {
    4: [999, 751, 499, 251],
    5: [999, 799, 599, 399, 199],
    6: [999, 835, 667, 499, 335, 167],
    7: [999, 859, 715, 571, 431, 287, 143],
    8: [999, 875, 751, 627, 499, 375, 251, 127],
}
SPEC_NON_EQUIDISTANT = {
    5: [999, 875, 751, 499, 251],
    6: [999, 875, 751, 627, 499, 251],
    7: [999, 875, 751, 627, 499, 375, 251],
}
SPEC_TARGETS = [0, 127, 143, 167, 199, 251, 287, 335, 375, 399, 431, 499, 571, 599, 627, 667, 715, 751, 799, 835,
                859, 875]


def sd_alphas_cumprod():
    """SD1.5/SDXL's scaled-linear beta schedule (test fixture only; tdd_core holds no betas)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


ABAR = sd_alphas_cumprod()
SIGMA_TABLE = ((1 - ABAR) / ABAR).sqrt()


def sigmas_for(timesteps):
    return torch.cat([SIGMA_TABLE[list(timesteps)], torch.zeros(1, dtype=torch.float64)])


def test_solver_grid():
    grid = solver_grid()
    assert len(grid) == 250 and grid[0] == 3 and grid[1] == 7 and grid[-1] == 999
    assert np.all(np.diff(grid) == 4)


@pytest.mark.parametrize("steps", sorted(SPEC_SCHEDULES))
def test_equidistant_schedules_match_spec(steps):
    assert tdd_timesteps(steps) == SPEC_SCHEDULES[steps]


@pytest.mark.parametrize("steps", sorted(SPEC_NON_EQUIDISTANT))
def test_non_equidistant_schedules_match_spec(steps):
    assert schedule_timesteps(steps, non_equidistant=True) == SPEC_NON_EQUIDISTANT[steps]


@pytest.mark.parametrize("steps", [1, 2, 3, 9, 16, 25, 50])
def test_any_step_count_is_a_descending_grid_subset(steps):
    ts = tdd_timesteps(steps)
    assert len(ts) == steps and ts[0] == 999
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert set(ts) <= set(solver_grid().tolist())


@pytest.mark.parametrize("bad", [0, 51, -1, 2.5, True])
def test_bad_step_counts_are_refused(bad):
    with pytest.raises(ValueError, match="steps must be an integer from 1 to 50"):
        schedule_timesteps(bad)


def test_target_set_matches_spec():
    assert target_set(4, 8) == SPEC_TARGETS and len(SPEC_TARGETS) == 22


def test_target_set_other_ranges():
    assert target_set(4, 4) == [0, 251, 499, 751]
    assert target_set(2, 3) == [0, 335, 499, 667]
    with pytest.raises(ValueError, match="kmin"):
        target_set(8, 4)


def test_denoise_takes_the_tail_like_the_host():
    # host rule: total = int(steps / denoise), keep the last `steps` entries
    assert schedule_timesteps(4, denoise=0.5) == SPEC_SCHEDULES[8][-4:]
    assert schedule_timesteps(4, denoise=0.8) == SPEC_SCHEDULES[5][-4:]
    assert schedule_timesteps(2, denoise=0.4, non_equidistant=True) == SPEC_NON_EQUIDISTANT[5][-2:]
    with pytest.raises(ValueError, match="5, 6 or 7"):
        schedule_timesteps(4, non_equidistant=True)
    with pytest.raises(ValueError, match="denoise"):
        schedule_timesteps(4, denoise=0.0)


def test_tdd_core_never_imports_comfyui():
    code = ("import sys, tdd_core; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('comfy', 'comfy_api', 'nodes', 'folder_paths', 'comfy_extras')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- the step


def reference_vp_loop(denoiser, x_T, timesteps, eta, noises):
    """docs/method.md §2 literally, in VP form over discrete abar (independent of tdd_core)."""
    z = x_T * ABAR[timesteps[0]].sqrt()  # VE state x = z / a_t
    for i, t in enumerate(timesteps):
        a_t, s_t = ABAR[t].sqrt(), (1 - ABAR[t]).sqrt()
        x0 = denoiser(z / a_t, SIGMA_TABLE[t])
        eps = (z - a_t * x0) / s_t
        if i == len(timesteps) - 1:
            return x0
        t_next = timesteps[i + 1]
        s = math.floor((1 - eta) * t_next)
        z_s = ABAR[s].sqrt() * x0 + (1 - ABAR[s]).sqrt() * eps
        ratio = ABAR[t_next] / ABAR[s]
        z = ratio.sqrt() * z_s + (1 - ratio).sqrt() * noises[i]


def toy_denoiser(x, sigma):
    return torch.tanh(0.7 * x / (1 + sigma)) + 0.05 * x


def run_tdd(timesteps, eta, noises, x_T, clip_steps=0):
    it = iter(noises)
    return sample_tdd(lambda x, s: toy_denoiser(x, s[0]), x_T, sigmas_for(timesteps), disable=True,
                      noise_sampler=lambda s, sn: next(it), eta=eta, x0_clip_steps=clip_steps,
                      space=VarianceExploding(SIGMA_TABLE))


@pytest.mark.parametrize("steps", [4, 5, 6, 7, 8])
@pytest.mark.parametrize("eta", [0.0, 0.2, 0.3, 1.0])
def test_ve_sampler_equals_spec_vp_form(steps, eta):
    g = torch.Generator().manual_seed(steps)
    x_T = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) * SIGMA_TABLE[999]
    noises = [torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(steps)]
    ts = SPEC_SCHEDULES[steps]
    ours = run_tdd(ts, eta, noises, x_T)
    ref = reference_vp_loop(toy_denoiser, x_T, ts, eta, noises)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


# Golden full-loop results (diffusers-style): sum and mean |x| of the output for a fixed toy
# denoiser, start latent and noise seed. Cross-checked by the VP-form test above; they change only
# if the step maths or the seeded noise stream changes.
GOLDEN = {
    (4, 0.0): (-9.843740572076456, 0.45739709666548384),
    (4, 0.2): (-10.51812472106198, 0.5006735951636716),
    (4, 0.3): (-8.832047585383851, 0.4644845354302406),
    (8, 0.0): (-8.63369554546155, 0.40010242240496585),
    (8, 0.2): (3.1227541624876154, 0.3421771414307075),
    (8, 0.3): (5.7662943405630775, 0.3093860701745108),
}


@pytest.mark.parametrize("steps,eta", sorted(GOLDEN))
def test_full_loop_golden_values(steps, eta):
    sig = sigmas_for(schedule_timesteps(steps))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sig[0]
    out = sample_tdd(lambda x, s, **kw: toy_denoiser(x, s[0]), x, sig, extra_args={"seed": 0}, disable=True,
                     eta=eta, space=VarianceExploding(SIGMA_TABLE))
    total, mean_abs = GOLDEN[(steps, eta)]
    assert float(out.sum()) == pytest.approx(total, rel=1e-6, abs=1e-9)
    assert float(out.abs().mean()) == pytest.approx(mean_abs, rel=1e-6)


def test_target_timestep_is_floor_of_shrunk_next_timestep():
    ve = VarianceExploding(SIGMA_TABLE)
    for t_next, eta, s in [(751, 0.2, 600), (499, 0.2, 399), (251, 0.3, 175), (127, 0.0, 127), (875, 1.0, 0)]:
        assert ve.target_sigma(SIGMA_TABLE[t_next], eta) == pytest.approx(float(SIGMA_TABLE[s]), rel=1e-12)


def test_eta_zero_is_a_deterministic_ddim_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64) * 5
    x0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    sigma, sigma_next = SIGMA_TABLE[751], SIGMA_TABLE[499]
    noise = torch.randn(3, 4, generator=g, dtype=torch.float64)
    out = tdd_core.tdd_step(VarianceExploding(SIGMA_TABLE), x, x0, sigma, sigma_next, 0.0, noise)
    ddim = x0 + sigma_next * (x - x0) / sigma  # DDIM in VE form
    torch.testing.assert_close(out, ddim)
    flow = FlowMatching()
    xf = tdd_core.tdd_step(flow, x, x0, 0.8, 0.5, 0.0, noise)
    eps = (x - 0.2 * x0) / 0.8
    torch.testing.assert_close(xf, 0.5 * x0 + 0.5 * eps)


def test_eta_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        run_tdd(SPEC_SCHEDULES[4], 1.5, [], torch.zeros(1, 1))
    with pytest.raises(ValueError, match="eta"):
        FlowMatching().target_sigma(0.5, -0.1)


def test_seeded_reproducibility():
    sig = sigmas_for(SPEC_SCHEDULES[4]).float()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * sig[0]
    model = lambda x, s, **kw: toy_denoiser(x, s[0])
    a = sample_tdd(model, x, sig, extra_args={"seed": 7}, disable=True)
    b = sample_tdd(model, x, sig, extra_args={"seed": 7}, disable=True)
    c = sample_tdd(model, x, sig, extra_args={"seed": 8}, disable=True)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_callback_every_step_and_clipping_first_steps():
    seen = []
    sig = sigmas_for(SPEC_SCHEDULES[4]).float()
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * sig[0]
    big = lambda x, s: torch.full_like(x, 3.0)  # out of range predictions
    sample_tdd(big, x, sig, disable=True, x0_clip_steps=2, callback=seen.append)
    assert [c["i"] for c in seen] == [0, 1, 2, 3]
    assert [float(c["denoised"].max()) for c in seen] == [1.0, 1.0, 3.0, 3.0]


# ---------------------------------------------------------------- closed form: Gaussian data

MU, VAR = 0.7, 0.25


def gaussian_ve_denoiser(x, sigma):
    return MU + VAR / (VAR + sigma ** 2) * (x - MU)


def gaussian_flow_denoiser(x, sigma):
    a = 1.0 - sigma
    return MU + a * VAR / (a * a * VAR + sigma ** 2) * (x - a * MU)


def gaussian_start(sig0, n, space_is_flow, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = MU + VAR ** 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    eps = torch.randn(n, generator=g, dtype=torch.float64)
    return (1 - sig0) * x0 + sig0 * eps if space_is_flow else x0 + sig0 * eps


def test_fine_ddim_keeps_the_gaussian_marginal_ve():
    """eta = 0 over the whole 250-point solver grid with the exact denoiser of N(MU, VAR) data: the
    state stays on the data's marginal; at the last noisy level mean MU and variance VAR + sigma^2."""
    sig = SIGMA_TABLE[solver_grid()[::-1].copy()]
    x = gaussian_start(float(sig[0]), 40000, False)
    out = sample_tdd(lambda x, s, **kw: gaussian_ve_denoiser(x, s[0]), x, sig, disable=True, eta=0.0,
                     space=VarianceExploding(SIGMA_TABLE))
    assert float(out.mean()) == pytest.approx(MU, abs=0.01)
    assert float(out.var()) == pytest.approx(VAR + float(sig[-1]) ** 2, rel=0.03)


def test_fine_ddim_keeps_the_gaussian_marginal_flow():
    sig = torch.linspace(0.999, 0.02, 250, dtype=torch.float64)
    x = gaussian_start(float(sig[0]), 40000, True)
    out = sample_tdd(lambda x, s, **kw: gaussian_flow_denoiser(x, s[0]), x, sig, disable=True, eta=0.0,
                     space=FlowMatching())
    a = 1 - float(sig[-1])
    assert float(out.mean()) == pytest.approx(a * MU, abs=0.01)
    assert float(out.var()) == pytest.approx(a * a * VAR + float(sig[-1]) ** 2, rel=0.03)


@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("eta", [0.0, 0.2, 0.3, 1.0])
def test_gaussian_data_matches_closed_form_recursion(steps, eta):
    """For Gaussian data each VE TDD step is linear: x_n - MU = c (x - MU) + r n with
    c = (VAR + sigma_s sigma) / (VAR + sigma^2) and r^2 = sigma_n^2 - sigma_s^2, so the output's
    variance follows a closed-form recursion; the last step returns the posterior mean."""
    ts = tdd_timesteps(steps)
    sig = sigmas_for(ts)
    x = gaussian_start(float(sig[0]), 60000, False)
    var = VAR + float(sig[0]) ** 2
    for i, t in enumerate(ts):
        sigma = float(sig[i])
        if i == steps - 1:
            var *= (VAR / (VAR + sigma ** 2)) ** 2
            break
        t_next = ts[i + 1]
        s = math.floor((1 - eta) * t_next)
        sigma_s, sigma_n = float(SIGMA_TABLE[s]), float(SIGMA_TABLE[t_next])
        c = (VAR + sigma_s * sigma) / (VAR + sigma ** 2)
        var = c * c * var + sigma_n ** 2 - sigma_s ** 2
    out = sample_tdd(lambda x, s, **kw: gaussian_ve_denoiser(x, s[0]), x, sig, disable=True, eta=eta,
                     space=VarianceExploding(SIGMA_TABLE), extra_args={"seed": 1})
    assert float(out.mean()) == pytest.approx(MU, abs=0.01)
    assert float(out.var()) == pytest.approx(var, rel=0.03)


@pytest.mark.parametrize("space,sigma,sigma_next", [(VarianceExploding(), 3.0, 1.2), (FlowMatching(), 0.9, 0.4)])
def test_renoise_restores_the_marginal_at_sigma_next(space, sigma, sigma_next):
    """Given the true x0 and eps, one stochastic step lands exactly on the sigma_next marginal."""
    g = torch.Generator().manual_seed(3)
    n = 200000
    x0 = torch.full((n,), 0.5, dtype=torch.float64)
    eps = torch.randn(n, generator=g, dtype=torch.float64)
    x = x0 + sigma * eps if isinstance(space, VarianceExploding) else (1 - sigma) * x0 + sigma * eps
    out = tdd_core.tdd_step(space, x, x0, sigma, sigma_next, 0.3, torch.randn(n, generator=g, dtype=torch.float64))
    scale = 1.0 if isinstance(space, VarianceExploding) else 1 - sigma_next
    assert float(out.mean()) == pytest.approx(0.5 * scale, abs=0.01)
    assert float(out.std()) == pytest.approx(sigma_next, rel=0.01)


# ----------------------------------------------------------------------- clipping, guidance


def test_clip_first_steps():
    x = torch.tensor([-3.0, 0.5, 2.0])
    assert clip_first_steps(x, 0, 1).tolist() == [-1.0, 0.5, 1.0]
    assert clip_first_steps(x, 1, 1).tolist() == x.tolist()
    assert clip_first_steps(x, 0, 0).tolist() == x.tolist()


def test_dynamic_threshold():
    x = torch.linspace(-4, 4, 101).view(1, 101).repeat(2, 1)
    x[1] *= 0.5
    torch.testing.assert_close(dynamic_threshold(x, 0.9, 1.0), x.clamp(-1, 1))
    out = dynamic_threshold(x, 1.0, 10.0)  # s = max|x| per sample: rescaled into [-1, 1]
    torch.testing.assert_close(out[0], x[0] / 4)
    torch.testing.assert_close(out[1], x[1] / 2)
    with pytest.raises(ValueError, match="ratio"):
        dynamic_threshold(x, 0.0)


def test_guidance_combination_and_rescale():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    torch.testing.assert_close(cfg(cond, uncond, 1.0), cond)
    torch.testing.assert_close(cfg(cond, uncond, 1.7), uncond + 1.7 * (cond - uncond))
    guided = cfg(cond, uncond, 3.0)
    assert torch.equal(rescale(guided, cond, 0.0), guided)
    full = rescale(guided, cond, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))


def test_guidance_interval():
    assert [guidance_active(i, 4) for i in range(4)] == [True] * 4
    assert [guidance_active(i, 4, 0.0, 0.5) for i in range(4)] == [True, True, False, False]
    assert [guidance_active(i, 4, 0.5, 1.0) for i in range(4)] == [False, False, True, True]
    with pytest.raises(ValueError, match="interval"):
        guidance_active(0, 4, 0.8, 0.2)

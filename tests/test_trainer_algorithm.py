"""Unit tests of the trainer's pure pieces (docs/method.md §5): no ComfyUI, no model."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from tdd_core import target_set
from trainer.algorithm import (Cond, DiscreteSchedule, StepConfig, TargetSampler, compute_loss, draw_batch,
                               lcm_boundary, loss_fn, move_to, sample_generator, teacher_ddim_step)
from trainer.config import ConfigError, TrainConfig, fingerprint, parse_args, preset_names
from trainer.guards import MIN_LR_SAMPLES, lr_samples_warning
from trainer.loop import lr_lambda, resolve_precision
from trainer.lora_format import atomic_save_safetensors, build_metadata, read_tdd_metadata

TARGETS = target_set(4, 8)


def sd_sigmas():
    """SD1.5's scaled-linear schedule as ComfyUI's model_sampling.sigmas."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    return ((1 - abar) / abar).sqrt().float()


SCHED = DiscreteSchedule(sd_sigmas())


def draws(method, n=4000, eta_max=0.3):
    s = TargetSampler(method, 4, 8, eta_max)
    return [s.draw(sample_generator(0, g)) for g in range(n)]


def test_source_timesteps_on_grid_and_one_solver_step():
    ds = draws("tdd", 3000)
    for d in ds:
        assert d.t % 4 == 3 and 3 <= d.t <= 999
        assert d.t_prev == max(d.t - 4, 0)
    # n ~ U{0..249}: every grid point is reachable, roughly uniformly
    counts = Counter(d.t for d in ds)
    assert len(counts) > 240


def test_tdd_target_inside_window_and_below_t_prev():
    for d in draws("tdd"):
        m_star = max(v for v in TARGETS if v <= d.t_prev)
        window = [v for v in TARGETS if max(m_star - 260, 0) <= v <= m_star]
        assert d.tau in window
        assert d.s <= d.t_prev and d.s <= d.tau
        assert d.s >= math.floor(0.7 * d.tau)  # shrink factor (1 - u*0.3) in (0.7, 1]


def test_tdd_tau_uniform_over_window():
    s = TargetSampler("tdd")
    t_prev = 995  # m* = 875; window = target values in [615, 875]
    window = [int(v) for v in s.window(t_prev)]
    assert window == [v for v in TARGETS if 615 <= v <= 875]
    # draw many with t fixed by picking samples whose t_prev == 995
    taus = Counter()
    for g in range(60000):
        d = s.draw(sample_generator(1, g))
        if d.t_prev == 995:
            taus[d.tau] += 1
    assert set(taus) == set(window)
    n = sum(taus.values())
    for v in window:
        assert abs(taus[v] / n - 1 / len(window)) < 0.12


def test_shrink_factor_distribution():
    ds = [d for d in draws("tdd", 4000) if d.tau >= 200]
    ratios = torch.tensor([d.s / d.tau for d in ds])
    assert all(math.floor(0.7 * d.tau) <= d.s <= d.tau for d in ds)
    assert ratios.min() < 0.72 and ratios.max() > 0.98  # the whole (0.7, 1] range is used
    assert abs(float(ratios.mean()) - 0.85) < 0.02  # E[1 - 0.3u] = 0.85
    zero = draws("tdd", 200, eta_max=0.0)
    assert all(d.s == d.tau for d in zero)


def test_tcd_and_lcm_targets():
    for d in draws("tcd", 2000):
        assert 0 <= d.tau <= d.t_prev and math.floor(0.7 * d.tau) <= d.s <= d.tau
    assert all(d.s == 0 for d in draws("lcm", 500))


def test_empty_prompt_fraction_and_batch_split_invariance():
    sampler = TargetSampler("tdd")
    big = draw_batch(sampler, 3, range(4000), (4, 2, 2), 0.2)
    assert abs(float(big.empty.float().mean()) - 0.2) < 0.02
    # the same global indices drawn in two halves (two processes / micro-batches) give the same numbers
    a = draw_batch(sampler, 3, range(0, 4), (4, 2, 2), 0.2)
    b = draw_batch(sampler, 3, range(4, 8), (4, 2, 2), 0.2)
    whole = draw_batch(sampler, 3, range(8), (4, 2, 2), 0.2)
    assert torch.equal(torch.cat([a.noise, b.noise]), whole.noise)
    assert torch.equal(torch.cat([a.s, b.s]), whole.s)
    never = draw_batch(sampler, 3, range(200), (1,), 0.0)
    assert not never.empty.any()


def test_teacher_ddim_step_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    z, x0c, x0u = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    t, tp, w = torch.tensor([503, 7]), torch.tensor([499, 3]), 3.5
    got = teacher_ddim_step(z, x0c, x0u, t, tp, w, SCHED)
    abar = SCHED.abar
    for i in range(2):
        at, st = abar[t[i]].sqrt().item(), (1 - abar[t[i]]).sqrt().item()
        ap, sp = abar[tp[i]].sqrt().item(), (1 - abar[tp[i]]).sqrt().item()
        eps_c, eps_u = (z[i] - at * x0c[i]) / st, (z[i] - at * x0u[i]) / st
        eps_w = eps_c + w * (eps_c - eps_u)          # LCM convention == CFG scale 1 + w
        x0_w = x0c[i] + w * (x0c[i] - x0u[i])
        want = ap * x0_w + sp * eps_w
        assert torch.allclose(got[i], want, atol=1e-4)
        # equivalently: CFG with scale 4.5 on eps, then the DDIM update from z
        eps_cfg = eps_u + 4.5 * (eps_c - eps_u)
        x0_cfg = (z[i] - st * eps_cfg) / at
        assert torch.allclose(got[i], ap * x0_cfg + sp * eps_cfg, atol=1e-4)


def test_move_to_is_ddim_jump_and_identity_at_same_t():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([999, 500, 3])
    a, s = SCHED.coeffs(t, x0)
    z = a * x0 + s * eps
    assert torch.allclose(move_to(z, x0, t, t, SCHED), z, atol=1e-5)
    tgt = torch.tensor([251, 0, 0])
    a2, s2 = SCHED.coeffs(tgt, x0)
    assert torch.allclose(move_to(z, x0, t, tgt, SCHED), a2 * x0 + s2 * eps, atol=1e-4)


def test_loss_functions():
    p, t = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.0, 0.0, 0.0])
    c = 0.001
    want = ((torch.tensor([0.0, 1.0, 4.0]) + c * c).sqrt() - c).mean()
    assert torch.allclose(loss_fn(p, t, "huber", c), want)
    assert loss_fn(p, p, "huber", c) == 0
    assert torch.allclose(loss_fn(p, t, "l2"), torch.tensor(5.0 / 3))
    with pytest.raises(ValueError):
        loss_fn(p, t, "l1")


def test_lcm_boundary_conditions():
    c_skip, c_out = lcm_boundary(torch.tensor([0, 999]), torch.zeros(2, 1))
    assert c_skip[0].item() == pytest.approx(1.0) and c_out[0].item() == pytest.approx(0.0)
    assert c_skip[1].item() < 1e-6 and c_out[1].item() == pytest.approx(1.0, abs=1e-6)


def test_compute_loss_zero_when_student_is_consistent_and_teacher_uses_one_pass():
    """A perfect x0 oracle for a fixed x0 makes teacher, student and target agree: loss 0 (w=0)."""
    x0 = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    calls = []

    def oracle(z, t, c):
        calls.append(z.shape[0])
        return x0.repeat(z.shape[0] // 2, 1, 1, 1)

    d = draw_batch(TargetSampler("tdd"), 0, range(2), (4, 2, 2), 0.2)
    cond = uncond = Cond(torch.zeros(2, 3, 5))
    loss = compute_loss(oracle, oracle, x0, cond, uncond, d, SCHED, StepConfig(teacher_guidance=0.0))
    assert float(loss) < 1e-5
    assert calls[0] == 4  # cond + uncond batched into ONE teacher forward


def test_lr_schedules():
    mk = lambda **kw: lr_lambda(TrainConfig(teacher="x", data="y", max_steps=100, **kw))  # noqa: E731
    assert mk()(0) == 1.0 and mk()(99) == 1.0
    f = mk(lr_schedule="warmup", warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0 and f(50) == 1.0
    f = mk(lr_schedule="cosine", warmup_steps=10)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_config_toml_and_flag_override(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('teacher = "m.safetensors"\ndata = "imgs"\nmethod = "lcm"\nlr = 2e-5\n'
                    'eta-max = 0.25\nvalidation_prompts = ["a cat", "a dog"]\n')
    cfg = parse_args(["--config", str(toml), "--lr", "3e-6"])
    assert (cfg.method, cfg.lr, cfg.eta_max, cfg.validation_prompts) == ("lcm", 3e-6, 0.25, ["a cat", "a dog"])
    assert cfg.rank == 64 and cfg.alpha == 8 and cfg.teacher_guidance == 3.5
    # unset family-dependent settings are filled once the teacher's family is known (SD here; FLUX: §5.1)
    assert cfg.empty_prompt_prob is None and cfg.weight_decay is None
    cfg.apply_family_defaults("sdxl")
    assert (cfg.empty_prompt_prob, cfg.weight_decay, cfg.loss, cfg.lr) == (0.2, 0.0, "huber", 3e-6)
    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rate = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'learning_rate'"):
        parse_args(["--config", str(bad)])
    with pytest.raises(ConfigError, match="--kmin"):
        parse_args(["--teacher", "x", "--data", "y", "--kmin", "9"])
    with pytest.raises(ConfigError, match="--teacher"):
        parse_args(["--data", "y"])


def test_fingerprint_ignores_bookkeeping_but_not_semantics():
    a = TrainConfig(teacher="x", data="y")
    fa = fingerprint(a.fingerprint_fields("d", "t"))
    b = TrainConfig(teacher="x", data="y", max_steps=5, save_every=1, validate_every=3, out="o")
    assert fingerprint(b.fingerprint_fields("d", "t")) == fa
    assert fingerprint(TrainConfig(teacher="x", data="y", batch_size=2).fingerprint_fields("d", "t")) != fa
    # same global batch on two processes: same run
    assert fingerprint(TrainConfig(teacher="x", data="y", batch_size=2).fingerprint_fields("d", "t")) == \
        fingerprint(TrainConfig(teacher="x", data="y", batch_size=1, world_size=2).fingerprint_fields("d", "t"))
    assert TrainConfig(teacher="x", data="y", batch_size=3, grad_accum=4, world_size=2).global_batch == 24
    assert fingerprint(a.fingerprint_fields("d", "other-teacher")) != fa


@pytest.mark.parametrize("teacher_id, embedded", [("flux-0a1b", False), ("flux2-0a1b", True),
                                                  ("hunyuanvideo-0a1b", True)])
def test_fingerprint_holds_the_guidance_embedding_of_every_family_that_has_one(teacher_id, embedded):
    """--flux-guidance steers the targets of every guidance-embedded teacher (FLUX.1 by its id, as its old
    runs were fingerprinted; FLUX.2, HunyuanVideo... by the teacher's flag), so a resume must match it;
    a CFG teacher's runs ignore it."""
    def fp(guidance, embedding):
        cfg = TrainConfig(teacher="x", data="y", flux_guidance=guidance)
        return fingerprint(cfg.fingerprint_fields("d", teacher_id, embedded_guidance=embedding))
    assert fp(3.5, embedded) != fp(5.0, embedded)
    assert fp(3.5, False) == fp(5.0, False) or teacher_id.startswith("flux-")
    assert fingerprint(TrainConfig(teacher="x", data="y").fingerprint_fields("d", "sd3-0a1b")) == \
        fingerprint(TrainConfig(teacher="x", data="y", flux_guidance=5.0).fingerprint_fields("d", "sd3-0a1b"))


def test_metadata_roundtrip(tmp_path):
    meta = build_metadata(base_arch="sdxl", method="tdd", kmin=4, kmax=8, training_steps=123, rank=64, alpha=8)
    path = tmp_path / "l.safetensors"
    atomic_save_safetensors({"lora_unet_x.alpha": torch.tensor(8.0)}, path, meta)
    got = read_tdd_metadata(path)
    assert got == {"tdd_format_version": "1", "tdd_base_arch": "sdxl", "tdd_method": "tdd", "tdd_kmin": 4,
                   "tdd_kmax": 8, "tdd_recommended_steps": 4, "tdd_recommended_eta": 0.2,
                   "tdd_recommended_guidance": 1.7, "tdd_training_steps": 123}
    assert not list(tmp_path.glob("*.tmp*"))


def test_lora_format_has_no_comfy_import():
    src = (Path(__file__).resolve().parent.parent / "trainer" / "lora_format.py").read_text()
    assert "comfy" not in src.replace("ComfyUI", "")


def test_precision_defaults_follow_the_reference():
    """GPU default: fp32 frozen weights under bf16 autocast (fp16 without bf16), as the reference's fp32
    weights under fp16 autocast; CPU: fp32 throughout; the memory-saving base dtypes on request."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    cfg = TrainConfig(teacher="x", data="y")
    assert resolve_precision(cfg, cuda, bf16_supported=True) == ("bf16", "fp32")
    assert resolve_precision(cfg, cuda, bf16_supported=False) == ("fp16", "fp32")
    assert resolve_precision(cfg, cpu) == ("fp32", "fp32")
    assert resolve_precision(TrainConfig(teacher="x", data="y", base_dtype="bf16"), cuda, True) == ("bf16", "bf16")
    assert resolve_precision(TrainConfig(teacher="x", data="y", precision="bf16"), cpu) == ("bf16", "fp32")
    for bad in (dict(precision="fp16"), dict(base_dtype="fp16"), dict(base_dtype="fp8")):
        with pytest.raises(ConfigError, match="needs a GPU"):
            resolve_precision(TrainConfig(teacher="x", data="y", **bad), cpu)
    with pytest.raises(ConfigError, match="--base-dtype must be one of"):
        TrainConfig(teacher="x", data="y", base_dtype="int8").validate()


def test_presets_set_the_reference_hyper_parameters():
    assert {"sd15", "sdxl", "sdxl-adv"} <= set(preset_names())
    adv = parse_args(["--teacher", "x", "--data", "y", "--preset", "sdxl-adv"])
    assert (adv.lr, adv.batch_size, adv.accumulate_to, adv.max_steps, adv.rank, adv.alpha, adv.resolution) == \
        (2e-6, 14, 448, 100000, 64, 8, 1024)
    assert adv.adversarial and (adv.adv_weight, adv.adv_lr, adv.teacher_guidance, adv.empty_prompt_prob) == \
        (0.1, 1e-5, 3.5, 0.2)
    sdxl = parse_args(["--teacher", "x", "--data", "y", "--preset", "sdxl", "--max-steps", "7", "--batch-size", "8"])
    assert (sdxl.lr, sdxl.max_steps, sdxl.batch_size, sdxl.adversarial) == (1e-6, 7, 8, False)  # flags win
    # the global batch through accumulation, on any number of processes
    sdxl.world_size = 2
    assert sdxl.resolve_accumulation().grad_accum == 32 and sdxl.global_batch == 512
    sdxl.world_size = 3
    with pytest.raises(ConfigError, match="--accumulate-to 512 .* not a multiple of --batch-size 8 x 3"):
        sdxl.resolve_accumulation()
    explicit = parse_args(["--teacher", "x", "--data", "y", "--preset", "sd15", "--grad-accum", "2"])
    assert explicit.accumulate_to is None and explicit.resolve_accumulation().grad_accum == 2
    with pytest.raises(ConfigError, match="unknown preset 'sdxl-turbo': choose one of .*sd15, sdxl, sdxl-adv"):
        parse_args(["--teacher", "x", "--data", "y", "--preset", "sdxl-turbo"])


def test_lr_samples_guard_rail():
    assert lr_samples_warning(1e-6, 1, 1000) is not None  # the old defaults: 1000 samples at 1e-6
    msg = lr_samples_warning(1e-6, 1, 1000)
    assert "lr 1e-06 x 1000 samples" in msg and "--max-steps" in msg and "--lr" in msg
    assert lr_samples_warning(1e-6, 512, 100000) is None  # the reference's run
    assert lr_samples_warning(2e-4, 32, 1200) is None     # the demo LoRA's run
    assert lr_samples_warning(1.0, 1, 1, threshold=2.0) is not None
    assert lr_samples_warning(MIN_LR_SAMPLES, 1, 1) is None

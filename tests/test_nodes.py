"""The pack's nodes in-process against the real host (ComfyUI 0.3.75 or COMFYUI_PATH)."""
from __future__ import annotations

import pytest
import torch

from harness import run_node

SPEC_4 = [999, 751, 499, 251]


@pytest.fixture(scope="session")
def tiny_parts(host):
    return run_node(host, "TDDTestTinyModel", seed=0)


@pytest.fixture(scope="session")
def conds(host, tiny_parts):
    _, clip, _ = tiny_parts
    (pos,) = run_node(host, "CLIPTextEncode", clip=clip, text="a red circle at the top left")
    (neg,) = run_node(host, "CLIPTextEncode", clip=clip, text="")
    return pos, neg


def empty_latent(host, size=32):
    (lat,) = run_node(host, "EmptyLatentImage", width=size, height=size, batch_size=1)
    return lat


def custom_sample(host, model, conds, sampler, sigmas, seed=0, cfg=1.0, lat=None):
    pos, neg = conds
    out, _ = run_node(host, "SamplerCustom", model=model, add_noise=True, noise_seed=seed, cfg=cfg, positive=pos,
                      negative=neg, sampler=sampler, sigmas=sigmas,
                      latent_image=lat if lat is not None else empty_latent(host))
    return out["samples"]


def tdd_sampler(host, eta=0.2, clip_steps=0):
    return run_node(host, "TDDSampler", eta=eta, x0_clip_steps=clip_steps)[0]


def tdd_sigmas(host, model, steps=4, non_equidistant=False, denoise=1.0):
    return run_node(host, "TDDScheduler", model=model, steps=steps, non_equidistant=non_equidistant,
                    denoise=denoise)[0]


def counting(model):
    """A clone of ``model`` that counts model evaluations (one per cond/uncond entry)."""
    patched, calls = model.clone(), []

    def wrapper(apply_model, args):
        calls.append(len(args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched.set_model_unet_function_wrapper(wrapper)
    return patched, calls


# --------------------------------------------------------------------------------- scheduler


def test_scheduler_reads_the_models_own_sigmas(host, tiny_parts):
    model = tiny_parts[0]
    table = model.get_model_object("model_sampling").sigmas
    for steps, non_eq, denoise, timesteps in [(4, False, 1.0, SPEC_4), (8, False, 0.5, [499, 375, 251, 127]),
                                              (5, True, 1.0, [999, 875, 751, 499, 251])]:
        sig = tdd_sigmas(host, model, steps if denoise == 1.0 else 4, non_eq, denoise)
        torch.testing.assert_close(sig, torch.cat([table[timesteps], torch.zeros(1)]).float())


@pytest.mark.parametrize("model_type,space", [("EPS", "VarianceExploding"), ("V_PREDICTION", "VarianceExploding"),
                                              ("FLOW", "FlowMatching"), ("FLUX", "FlowMatching"),
                                              ("EDM", "VarianceExploding"), ("V_PREDICTION_EDM", "VarianceExploding")])
def test_every_parameterisation_gets_its_sigmas_and_space(host, model_type, space):
    import comfy.model_base
    import comfy.supported_models
    from harness import pack_module

    pack = pack_module()
    config = {"FLUX": comfy.supported_models.Flux, "FLOW": comfy.supported_models.SD3}.get(
        model_type, comfy.supported_models.SVD_img2vid if "EDM" in model_type else comfy.supported_models.SD15)
    unet_config = dict(config.unet_config)
    ms = comfy.model_base.model_sampling(config(unet_config), getattr(comfy.model_base.ModelType, model_type))
    sig = pack.nodes._host.tdd_sigmas(ms, 4)
    assert sig.shape == (5,) and sig[-1] == 0 and torch.all(sig[:-1] > 0) and torch.all(sig[:-2] > sig[1:-1])
    assert float(sig[0]) == pytest.approx(float(ms.sigma_max), rel=1e-3)
    chosen = pack.nodes._host.sampling_space(ms)
    assert type(chosen).__name__ == space
    if model_type in ("EPS", "V_PREDICTION"):
        assert chosen.sigma_table is not None
        torch.testing.assert_close(sig[:-1], ms.sigmas[SPEC_4].float())
    elif space == "VarianceExploding":
        assert chosen.sigma_table is None


def test_ksampler_names_are_registered(host):
    import comfy.samplers

    assert "tdd" in comfy.samplers.KSampler.SAMPLERS and "tdd" in comfy.samplers.KSampler.SCHEDULERS
    req = host.NODE_CLASS_MAPPINGS["KSamplerAdvanced"].INPUT_TYPES()["required"]
    assert "tdd" in req["sampler_name"][0] and "tdd" in req["scheduler"][0]


# ----------------------------------------------------------------------------------- sampler


def test_same_seed_same_image_and_callback_every_step(host, tiny_parts, conds):
    """The sampler calls the host's callback once per step, with each step's x0 (what the pack controls:
    the host may throttle how often that reaches the UI's progress hook, ComfyUI 0.33 does)."""
    import comfy.sample

    model = tiny_parts[0]
    pos, neg = conds
    lat = empty_latent(host)["samples"]
    seen = []
    a = comfy.sample.sample_custom(model, comfy.sample.prepare_noise(lat, 3), 1.0, tdd_sampler(host),
                                   tdd_sigmas(host, model), pos, neg, lat,
                                   callback=lambda i, x0, x, n: seen.append((i, n, x0.shape)), seed=3)
    b = custom_sample(host, model, conds, tdd_sampler(host), tdd_sigmas(host, model), seed=3)
    c = custom_sample(host, model, conds, tdd_sampler(host), tdd_sigmas(host, model), seed=4)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.isfinite(a).all()
    assert [(i, n) for i, n, _ in seen] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert {shape for _, _, shape in seen} == {lat.shape}


def test_eta_changes_the_result_and_zero_is_deterministic_in_the_noise(host, tiny_parts, conds):
    model = tiny_parts[0]
    sig = tdd_sigmas(host, model)
    ddim_a = custom_sample(host, model, conds, tdd_sampler(host, eta=0.0), sig, seed=1)
    stoch = custom_sample(host, model, conds, tdd_sampler(host, eta=0.3), sig, seed=1)
    assert not torch.allclose(ddim_a, stoch)
    # eta = 0 is DDIM: the same as the host's deterministic "ddim" sampler on the same sigmas
    (ddim_sampler,) = run_node(host, "KSamplerSelect", sampler_name="euler")
    euler = custom_sample(host, model, conds, ddim_sampler, sig, seed=1)
    torch.testing.assert_close(ddim_a, euler, rtol=1e-4, atol=1e-4)


def test_stock_ksampler_with_tdd_names_equals_custom_sampling(host, tiny_parts, conds):
    model = tiny_parts[0]
    pos, neg = conds
    (out,) = run_node(host, "KSampler", model=model, seed=11, steps=4, cfg=1.5, sampler_name="tdd", scheduler="tdd",
                      positive=pos, negative=neg, latent_image=empty_latent(host), denoise=1.0)
    custom = custom_sample(host, model, conds, tdd_sampler(host, eta=0.2), tdd_sigmas(host, model), seed=11, cfg=1.5)
    torch.testing.assert_close(out["samples"], custom)


def test_inpainting_mask_keeps_the_unmasked_latent(host, tiny_parts, conds):
    model = tiny_parts[0]
    original = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(1, 32, 32)
    mask[:, :16] = 1.0  # repaint the top half only
    lat = {"samples": original, "noise_mask": mask}
    out = custom_sample(host, model, conds, tdd_sampler(host), tdd_sigmas(host, model, denoise=0.75), seed=2, lat=lat)
    torch.testing.assert_close(out[:, :, 2:], original[:, :, 2:], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out[:, :, :2], original[:, :, :2])


def test_sampler_clip_steps_clamp_the_first_predictions(host, tiny_parts, conds):
    import comfy.sample

    model = tiny_parts[0]
    pos, neg = conds
    lat = empty_latent(host)["samples"]
    noise = comfy.sample.prepare_noise(lat, 0)
    for clip_steps in (0, 2):
        seen = []
        comfy.sample.sample_custom(model, noise, 1.0, tdd_sampler(host, clip_steps=clip_steps), tdd_sigmas(host, model),
                                   pos, neg, lat, callback=lambda i, x0, x, n: seen.append(float(x0.abs().max())),
                                   disable_pbar=True, seed=0)
        if clip_steps:
            assert seen[0] <= 1.0 and seen[1] <= 1.0
        else:
            assert seen[0] > 1.0  # a random-weight model predicts far outside [-1, 1] at sigma_max


def test_bad_eta_is_refused(host):
    with pytest.raises(ValueError, match=r"TDD Sampler: eta = 1.5 is out of range; allowed: 0.0 to 1.0"):
        tdd_sampler(host, eta=1.5)  # a linked value, which prompt validation cannot see
    with pytest.raises(ValueError, match=r"eta = nan is not a finite number"):
        tdd_sampler(host, eta=float("nan"))


# ---------------------------------------------------------------------------------- guidance


def guided(host, model, conds, steps=4, **kw):
    pos, neg = conds
    options = dict(scale=1.7, guidance_start=0.0, guidance_end=1.0, rescale=0.0) | kw
    (guider,) = run_node(host, "TDDGuidance", model=model, positive=pos, negative=neg, **options)
    (noise,) = run_node(host, "RandomNoise", noise_seed=9)
    out, _ = run_node(host, "SamplerCustomAdvanced", noise=noise, guider=guider, sampler=tdd_sampler(host),
                      sigmas=tdd_sigmas(host, model, steps), latent_image=empty_latent(host))
    return out["samples"]


def test_guidance_defaults_equal_stock_cfg_and_count_evaluations(host, tiny_parts, conds):
    model, calls = counting(tiny_parts[0])
    ours = guided(host, model, conds)
    assert sum(calls) == 8
    pos, neg = conds
    (stock,) = run_node(host, "CFGGuider", model=tiny_parts[0], positive=pos, negative=neg, cfg=1.7)
    (noise,) = run_node(host, "RandomNoise", noise_seed=9)
    ref, _ = run_node(host, "SamplerCustomAdvanced", noise=noise, guider=stock, sampler=tdd_sampler(host),
                      sigmas=tdd_sigmas(host, tiny_parts[0]), latent_image=empty_latent(host))
    torch.testing.assert_close(ours, ref["samples"])


def test_guidance_interval_saves_evaluations(host, tiny_parts, conds):
    model, calls = counting(tiny_parts[0])
    full = guided(host, model, conds)
    calls.clear()
    half = guided(host, model, conds, guidance_end=0.5)
    assert sum(calls) == 6  # 2 guided steps x 2 + 2 conditional steps x 1
    assert not torch.allclose(full, half)
    calls.clear()
    guided(host, model, conds, scale=1.0)
    assert sum(calls) == 4


def test_guidance_rescale_changes_and_is_off_by_default(host, tiny_parts, conds):
    model = tiny_parts[0]
    base = guided(host, model, conds, scale=3.0)
    resc = guided(host, model, conds, scale=3.0, rescale=0.7)
    assert not torch.allclose(base, resc)


def test_guidance_interval_validation(host):
    cls = host.NODE_CLASS_MAPPINGS["TDDGuidance"]
    assert cls.validate_inputs(guidance_start=0.0, guidance_end=0.5) is True
    assert "guidance_start <= guidance_end" in cls.validate_inputs(guidance_start=0.8, guidance_end=0.2)


# ------------------------------------------------------------------------------------ x0 clip


def first_step_x0(host, model, conds, sampler_name="euler"):
    import comfy.sample

    pos, neg = conds
    lat = empty_latent(host)["samples"]
    seen = []
    (sampler,) = run_node(host, "KSamplerSelect", sampler_name=sampler_name)
    comfy.sample.sample_custom(model, comfy.sample.prepare_noise(lat, 0), 1.0, sampler, tdd_sigmas(host, model),
                               pos, neg, lat, callback=lambda i, x0, x, n: seen.append(x0.clone()),
                               disable_pbar=True, seed=0)
    return seen


@pytest.mark.parametrize("sampler_name", ["euler", "lcm"])
def test_x0_clip_patch_clamps_first_steps_under_stock_samplers(host, tiny_parts, conds, sampler_name):
    model = tiny_parts[0]
    plain = first_step_x0(host, model, conds, sampler_name)
    (patched,) = run_node(host, "TDDX0Clip", model=model, mode="clamp", clip_steps=1, ratio=0.995, max_value=1.0)
    clipped = first_step_x0(host, patched, conds, sampler_name)
    assert float(plain[0].abs().max()) > 1.0
    torch.testing.assert_close(clipped[0], plain[0].clamp(-1, 1))
    assert torch.equal(clipped[1], first_step_x0(host, patched, conds, sampler_name)[1])
    (off,) = run_node(host, "TDDX0Clip", model=model, mode="clamp", clip_steps=0, ratio=0.995, max_value=1.0)
    torch.testing.assert_close(first_step_x0(host, off, conds, sampler_name)[0], plain[0])


def test_x0_clip_quantile_mode(host, tiny_parts, conds):
    from tdd_core import dynamic_threshold

    model = tiny_parts[0]
    plain = first_step_x0(host, model, conds)
    (patched,) = run_node(host, "TDDX0Clip", model=model, mode="quantile", clip_steps=1, ratio=0.9, max_value=4.0)
    torch.testing.assert_close(first_step_x0(host, patched, conds)[0], dynamic_threshold(plain[0], 0.9, 4.0))


# -------------------------------------------------------------------------------- LoRA loader


def lora_output(host, model, conds, seed=0):
    return custom_sample(host, model, conds, tdd_sampler(host), tdd_sigmas(host, model), seed=seed)


def test_lora_loader_loads_the_tiny_lora_and_changes_output(host, tiny_parts, conds, lora_files):
    model, clip, _ = tiny_parts
    new_model, new_clip, info, *_ = run_node(host, "TDDLoraLoader", model=model, clip=clip,
                                         lora_name=lora_files["good"].name, strength_model=1.0, strength_clip=1.0)
    assert "kohya" in info and lora_files["good"].name in info
    assert not torch.allclose(lora_output(host, new_model, conds), lora_output(host, model, conds))
    zero, *_ = run_node(host, "TDDLoraLoader", model=model, clip=clip, lora_name=lora_files["good"].name,
                          strength_model=0.0, strength_clip=0.0)
    torch.testing.assert_close(lora_output(host, zero, conds), lora_output(host, model, conds))


def test_peft_lora_without_alpha_is_applied_at_trained_scale(host, tiny_parts, conds, lora_files, comfy_base):
    import comfy.lora
    import safetensors.torch

    model, clip, _ = tiny_parts
    kohya = safetensors.torch.load_file(str(lora_files["good"]))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    peft, scaled_kohya = {}, {}
    for key, tensor in kohya.items():
        module, _, suffix = key.partition(".")
        generic = key_map[module][: -len(".weight")]  # e.g. diffusion_model.input_blocks.1.1....attn1.to_q
        if suffix == "lora_down.weight":
            peft[f"{generic}.lora_A.weight"] = tensor
            scaled_kohya[key] = tensor
            scaled_kohya[f"{module}.alpha"] = torch.tensor(tensor.shape[0] * 8 / 64)
        elif suffix == "lora_up.weight":
            peft[f"{generic}.lora_B.weight"] = tensor
            scaled_kohya[key] = tensor
    loras = comfy_base / "models" / "loras"
    safetensors.torch.save_file(peft, str(loras / "peft_no_alpha.safetensors"))
    safetensors.torch.save_file(scaled_kohya, str(loras / "kohya_scaled.safetensors"))
    a, _, info, *_ = run_node(host, "TDDLoraLoader", model=model, clip=None, lora_name="peft_no_alpha.safetensors",
                          strength_model=1.0, strength_clip=1.0)
    b, *_ = run_node(host, "TDDLoraLoader", model=model, clip=None, lora_name="kohya_scaled.safetensors",
                       strength_model=1.0, strength_clip=1.0)
    assert "8/64" in info
    torch.testing.assert_close(lora_output(host, a, conds), lora_output(host, b, conds))


def test_lora_metadata_is_shown(host, tiny_parts, lora_files, comfy_base):
    import safetensors.torch

    tensors = safetensors.torch.load_file(str(lora_files["good"]))
    path = comfy_base / "models" / "loras" / "with_meta.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"tdd_method": "tdd", "tdd_recommended_steps": "4"})
    _, _, info, *_ = run_node(host, "TDDLoraLoader", model=tiny_parts[0], clip=tiny_parts[1], lora_name=path.name,
                          strength_model=1.0, strength_clip=1.0)
    assert "method=tdd" in info and "recommended_steps=4" in info


def test_lora_for_another_architecture_names_file_and_count(host, tiny_parts, lora_files):
    with pytest.raises(ValueError, match=rf"'{lora_files['sdxl'].name}' does not fit this model: \d+ of \d+ LoRA modules"):
        run_node(host, "TDDLoraLoader", model=tiny_parts[0], clip=tiny_parts[1], lora_name=lora_files["sdxl"].name,
                 strength_model=1.0, strength_clip=1.0)


def test_corrupt_missing_and_non_safetensors_loras(host, tiny_parts, lora_files, comfy_base):
    model, clip, _ = tiny_parts
    with pytest.raises(ValueError, match=rf"'{lora_files['corrupt'].name}' could not be read .*corrupt"):
        run_node(host, "TDDLoraLoader", model=model, clip=clip, lora_name=lora_files["corrupt"].name,
                 strength_model=1.0, strength_clip=1.0)
    with pytest.raises(FileNotFoundError, match="'gone.safetensors' was not found in models/loras"):
        run_node(host, "TDDLoraLoader", model=model, clip=clip, lora_name="gone.safetensors",
                 strength_model=1.0, strength_clip=1.0)
    pt = comfy_base / "models" / "loras" / "pickled.pt"
    torch.save({"x": torch.zeros(1)}, pt)
    with pytest.raises(ValueError, match="'pickled.pt' is not a .safetensors file"):
        run_node(host, "TDDLoraLoader", model=model, clip=clip, lora_name=pt.name,
                 strength_model=1.0, strength_clip=1.0)

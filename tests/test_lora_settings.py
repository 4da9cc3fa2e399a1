"""Settings that travel with a TDD LoRA: the loader's steps / eta / guidance outputs, and the FLUX
facts behind their FLUX values, checked against diffusers' own FluxPipeline schedule and Euler step."""
from __future__ import annotations

import types

import numpy as np
import pytest
import safetensors.torch
import torch

from harness import pack_module, run_node

FLUX_DEV_SCHEDULER = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                          max_image_seq_len=4096, shift=3.0)  # FLUX.1-dev's scheduler_config.json


def settings():
    return pack_module().nodes.lora_settings


def load(host, model, clip, name):
    return run_node(host, "TDDLoraLoader", model=model, clip=clip, lora_name=name, strength_model=1.0,
                    strength_clip=1.0)


def with_metadata(comfy_base, source, name, metadata):
    path = comfy_base / "models" / "loras" / name
    safetensors.torch.save_file(safetensors.torch.load_file(str(source)), str(path), metadata=metadata)
    return path.name


def test_outputs_are_appended_after_model_clip_info(host):
    """Stored workflows link MODEL=0, CLIP=1, info=2: the new outputs come after them."""
    schema = host.NODE_CLASS_MAPPINGS["TDDLoraLoader"].define_schema()
    assert [o.io_type for o in schema.outputs] == ["MODEL", "CLIP", "STRING", "INT", "FLOAT", "FLOAT"]
    assert [o.id for o in schema.outputs][2:] == ["info", "steps", "eta", "guidance"]


def test_trainer_metadata_gives_the_settings(host, lora_files, comfy_base):
    model, clip, _ = run_node(host, "TDDTestTinyModel", seed=0)
    name = with_metadata(comfy_base, lora_files["good"], "meta_6_03_13.safetensors",
                         {"tdd_method": "tdd", "tdd_recommended_steps": "6", "tdd_recommended_eta": "0.3",
                          "tdd_recommended_guidance": "1.3"})
    _, _, info, steps, eta, guidance = load(host, model, clip, name)
    assert (steps, eta, guidance) == (6, 0.3, 1.3)
    assert type(steps) is int and type(eta) is float and type(guidance) is float
    for key in ("steps", "eta", "guidance"):
        assert f"{key}: the file's tdd_recommended_{key} metadata" in info, info


def test_at_steps_gives_the_calibrations_setting_for_that_count(host, lora_files, comfy_base):
    """A calibrated file asked for another step count: that count, with the guidance and eta its
    calibration chose there; a count it did not calibrate keeps the recommended ones (at 2-3 steps:
    guidance 1.0)."""
    import json

    model, clip, _ = run_node(host, "TDDTestTinyModel", seed=0)
    table = {"criterion": "lowpass", "prompts": 32, "reference": "25-step image at guidance 4.5",
             "best": {"2": {"guidance": 1.0, "eta": 0.0}, "4": {"guidance": 1.3, "eta": 0.1},
                      "8": {"guidance": 1.5, "eta": 0.2}}}
    name = with_metadata(comfy_base, lora_files["good"], "calibrated.safetensors",
                         {"tdd_recommended_steps": "4", "tdd_recommended_eta": "0.1",
                          "tdd_recommended_guidance": "1.3", "tdd_calibration": json.dumps(table)})

    def at(steps):
        return run_node(host, "TDDLoraLoader", model=model, clip=clip, lora_name=name, strength_model=1.0,
                        strength_clip=1.0, at_steps=steps)[2:]

    info, *values = at(0)
    assert tuple(values) == (4, 0.1, 1.3) and "calibrated on 32 prompts" in info, info
    info, *values = at(8)
    assert tuple(values) == (8, 0.2, 1.5) and "calibration at 8 steps" in info, info
    assert tuple(at(2)[1:]) == (2, 0.0, 1.0)
    info, *values = at(6)  # not calibrated at 6: the recommended eta and guidance
    assert tuple(values) == (6, 0.1, 1.3) and "at_steps input" in info, info
    info, *values = at(3)  # not calibrated at 3 either: the few-step default guidance
    assert tuple(values) == (3, 0.1, 1.0) and "3 steps or fewer" in info, info


def test_at_steps_on_a_file_without_calibration(host, lora_files):
    model, clip, _ = run_node(host, "TDDTestTinyModel", seed=0)
    out = run_node(host, "TDDLoraLoader", model=model, clip=clip, lora_name=lora_files["good"].name,
                   strength_model=1.0, strength_clip=1.0, at_steps=2)
    assert tuple(out[3:]) == (2, 0.2, 1.0)
    out = run_node(host, "TDDLoraLoader", model=model, clip=clip, lora_name=lora_files["good"].name,
                   strength_model=1.0, strength_clip=1.0, at_steps=8)
    assert tuple(out[3:]) == (8, 0.2, 1.7)
    ls = settings()
    assert ls.recommended_settings({}, "flux", None, at_steps=2).guidance == 2.0  # FLUX guidance is not CFG


def test_no_metadata_on_a_family_without_release_gives_tdd_defaults(host, lora_files):
    model, clip, _ = run_node(host, "TDDTestTinyModel", seed=0)
    _, _, info, *values = load(host, model, clip, lora_files["good"].name)
    assert tuple(values) == (4, 0.2, 1.7)
    assert info.count("TDD defaults (no tdd_* metadata") == 3, info


def test_unusable_metadata_falls_back_and_says_so(host, lora_files, comfy_base):
    model, clip, _ = run_node(host, "TDDTestTinyModel", seed=0)
    name = with_metadata(comfy_base, lora_files["good"], "meta_bad.safetensors",
                         {"tdd_recommended_steps": "0", "tdd_recommended_eta": "nan",
                          "tdd_recommended_guidance": "2.5"})
    _, _, info, *values = load(host, model, clip, name)
    assert tuple(values) == (4, 0.2, 2.5)
    assert "tdd_recommended_steps='0' in the file is unusable" in info
    assert "tdd_recommended_eta='nan' in the file is unusable" in info


def test_released_sdxl_file_on_an_sdxl_model(host, tiny, comfy_base):
    """A metadata-less kohya file on an SDXL-class model gets the SDXL reference settings."""
    model = tiny.build_tiny_unet(0, family="SDXL")
    path = comfy_base / "models" / "loras" / "sdxl_release_like.safetensors"
    tiny.write_kohya_lora(path, model, rank=2)
    _, _, info, *values = load(host, model, None, path.name)
    assert tuple(values) == (4, 0.2, 1.7)
    assert "SDXL model, kohya keys (the SDXL release format): TDD reference settings for SDXL" in info, info


def test_flux_family_and_release_format(host):
    """FLUX.1 (and only FLUX.1, not later models on its class) gets 8 steps, eta 0, FLUX guidance 2."""
    import comfy.model_base

    ls = settings()
    as_patcher = lambda cls: types.SimpleNamespace(model=cls.__new__(cls))  # the host's real model classes
    assert ls.model_family(as_patcher(comfy.model_base.Flux)) == "flux"
    assert ls.model_family(as_patcher(comfy.model_base.Chroma)) is None
    assert ls.model_family(as_patcher(comfy.model_base.SVD_img2vid)) == "svd"
    peft = ["transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    fmt = ls.released_format(peft)
    assert fmt == "PEFT keys without alpha (the FLUX.1-dev release format)"
    rec = ls.recommended_settings({}, "flux", fmt)
    assert rec.values() == (8, 0.0, 2.0)
    assert "FluxGuidance" in rec.describe() and "eta 0.2 is an option to try" in rec.describe()
    assert ls.released_format(peft + ["transformer.transformer_blocks.0.attn.to_q.alpha"]) is None
    assert ls.recommended_settings({}, "svd").values() == (4, 0.3, 1.0)


@pytest.mark.parametrize("width,height", [(1024, 1024), (768, 1344), (512, 512)])
def test_flux_tdd_schedule_is_fluxpipelines_shifted_schedule(host, width, height):
    """On FLUX (ComfyUI's ModelSamplingFlux at the resolution's shift, as its ModelSamplingFlux node
    sets it, 1.15 by default = 1024x1024) the 8-step TDD schedule is diffusers' FluxPipeline
    schedule to within 0.005 in sigma."""
    import comfy.model_sampling
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    seq_len = (height // 16) * (width // 16)  # 2x2 patches of the 8x-downsampled latent
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=mu)  # FluxPipeline's call
    reference = scheduler.sigmas.double()

    sampling = comfy.model_sampling.ModelSamplingFlux()
    sampling.set_parameters(shift=mu)
    tdd = pack_module().nodes._host.tdd_sigmas(sampling, 8).double()
    assert tdd.shape == reference.shape == (9,)
    assert (tdd - reference).abs().max() < 0.005, (tdd, reference)


def test_flux_tdd_step_with_eta_0_is_fluxpipelines_euler_step(host):
    """With eta 0 the TDD step in flow-matching space is FlowMatchEulerDiscreteScheduler.step, and a
    whole 8-step run matches diffusers' Euler loop on the same sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    core = pack_module().tdd_core
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)

    def velocity(x, sigma):  # a smooth stand-in transformer: x0 = tanh(target + 0.1 x), v = (x - x0) / sigma
        return (x - torch.tanh(target + 0.1 * x)) / sigma.reshape(-1, 1, 1, 1)

    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=1.15)
    sigmas = scheduler.sigmas.double()
    x_ref = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    x_tdd = x_ref.clone()
    for t in scheduler.timesteps:
        s_in = scheduler.sigmas[scheduler.index_for_timestep(t)].double().repeat(2)
        x_ref = scheduler.step(velocity(x_ref, s_in), t, x_ref, return_dict=False)[0]

    def denoiser(x, sigma):  # ComfyUI's wrapped model returns x0 = x - sigma * v
        return x - sigma.reshape(-1, 1, 1, 1) * velocity(x, sigma)

    x_tdd = core.sample_tdd(denoiser, x_tdd, sigmas, eta=0.0, space=core.FlowMatching(), disable=True)
    torch.testing.assert_close(x_tdd, x_ref, rtol=1e-5, atol=1e-5)  # diffusers steps in float32
    # and one step on its own, mid-schedule
    x, sigma, nxt = x_ref.clone() + 0.3, sigmas[3:4].repeat(2), sigmas[4]
    v = velocity(x, sigma)
    euler = x + (nxt - sigma[0]) * v
    step = core.tdd_step(core.FlowMatching(), x, x - sigma[0] * v, sigma[0], nxt, 0.0, torch.randn_like(x))
    torch.testing.assert_close(step, euler, rtol=1e-12, atol=1e-12)


def test_settings_wire_into_the_tdd_nodes_over_http(server):
    """A user wires the loader's steps / eta / guidance into TDD Scheduler, TDD Sampler and TDD
    Guidance: the prompt validates, runs, and gives the image of the same values typed in."""
    from test_server_tdd import image_of, tdd_graph

    wired = tdd_graph(seed=11)
    wired["7"]["inputs"]["steps"] = ["2", 3]
    wired["8"]["inputs"]["eta"] = ["2", 4]
    wired["6"]["inputs"]["scale"] = ["2", 5]
    typed = tdd_graph(seed=11)
    typed["6"]["inputs"]["scale"] = 1.7  # tiny_tdd.safetensors: no metadata, SD1.5-class: 4 / 0.2 / 1.7
    entry = server.run(wired)
    assert image_of(server, entry).std() > 0
    np.testing.assert_array_equal(image_of(server, entry), image_of(server, server.run(typed)))
    other = tdd_graph(seed=11, steps=6)
    assert np.abs(image_of(server, server.run(other)) - image_of(server, entry)).max() > 0  # steps matter

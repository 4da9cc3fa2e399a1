"""The trainer's LoRA against the host: key mapping on full-size architectures (meta device) and the
stock LoraLoader path on the tiny model."""
from __future__ import annotations


import pytest
import torch

import trainer_fixtures as fx

from trainer.lora import LoRANetwork
from trainer.lora_format import atomic_save_safetensors, build_metadata, read_tdd_metadata
from trainer.models import Teacher, TeacherError, from_components, lora_targets

pytestmark = pytest.mark.usefixtures("trainer_host")


@pytest.mark.parametrize("arch,modules", [("sd15", 278), ("sd2x", 278), ("sdxl", 788)])
def test_every_written_key_maps_through_host_key_map(arch, modules):
    import comfy.lora
    import comfy.utils

    model = fx.meta_model(arch)
    targets = lora_targets(model)
    assert len(targets) == modules  # SDXL: 788 modules, as the released TDD SDXL LoRA
    network = LoRANetwork(targets, rank=4, alpha=2)
    keys = network.kohya_state_dict().keys()
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    prefixes = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    unmatched = sorted(p for p in prefixes if p not in key_map)
    assert unmatched == []
    assert len(keys) == 3 * modules
    # ... and each key lands on the very layer the trainer's adapter wraps
    names = {id(m): n for n, m in model.diffusion_model.named_modules()}
    for prefix, module in targets.items():
        assert key_map[prefix] == f"diffusion_model.{names[id(module)]}.weight"
    kinds = {p.split("_")[-1] for p in prefixes}
    assert {"q", "k", "v", "0", "in", "out", "proj", "2", "conv1", "conv2", "shortcut", "conv"} <= kinds


def test_flow_and_unsupported_teachers_are_refused():
    from types import SimpleNamespace

    with pytest.raises(TeacherError, match="FLUX diffusion model without its text encoders"):
        Teacher(SimpleNamespace(model=fx.meta_flux()), None, None)
    import comfy.model_detection
    cfg = dict(fx.FULL_UNET_CONFIGS["sdxl"], adm_in_channels=2560, model_channels=384, num_res_blocks=[2, 2, 2, 2],
               transformer_depth=[0, 0, 4, 4, 4, 4, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=4,
               context_dim=1280, transformer_depth_output=[0, 0, 0, 4, 4, 4, 4, 4, 4, 0, 0, 0])
    refiner = comfy.model_detection.model_config_from_unet_config(cfg).get_model({}, "model.", device=torch.device("meta"))
    with pytest.raises(TeacherError, match="unsupported teacher architecture SDXLRefiner.*SD1.5, SD2.x"):
        Teacher(SimpleNamespace(model=refiner), None, None)


@pytest.fixture(scope="module")
def tiny():
    return fx.tiny_sd15(0)


def _forward(model, x, sigma, ctx):
    return model.apply_model(x, sigma, c_crossattn=ctx)


def test_trainer_lora_through_stock_lora_loader(tiny, tmp_path):
    import comfy.sd
    import comfy.utils

    patcher, clip, vae = tiny
    teacher = from_components(patcher, clip, vae)
    network = LoRANetwork(teacher.lora_targets(), rank=4, alpha=2, seed=0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, a in network.adapters():
            a.up.copy_(torch.randn(a.up.shape, generator=g) * 0.2)
    path = tmp_path / "tdd.safetensors"
    meta = build_metadata(base_arch=teacher.arch, method="tdd", kmin=4, kmax=8, training_steps=7, rank=4, alpha=2)
    atomic_save_safetensors(network.kohya_state_dict(torch.float32), path, meta)
    assert read_tdd_metadata(path)["tdd_training_steps"] == 7

    x = torch.randn(2, 4, 8, 8, generator=g)
    sigma = teacher.sigmas[[600, 200]]
    ctx, _ = teacher.encode_text(["a red square", ""])
    base = _forward(patcher.model, x, sigma, ctx)

    network.attach()
    hooked = _forward(patcher.model, x, sigma, ctx)
    with network.disabled():
        assert torch.equal(_forward(patcher.model, x, sigma, ctx), base)  # teacher = same weights, LoRA off
    network.detach_hooks()

    lora_sd = comfy.utils.load_torch_file(str(path))
    for strength, want in ((1.0, hooked), (0.0, base)):
        m2, _ = comfy.sd.load_lora_for_models(patcher, None, lora_sd, strength, 0.0)
        # every key of the file was matched (the host logs and drops unmatched ones)
        loaded = {k for k in m2.patches}
        assert len(loaded) == len(network.prefixes)
        m2.patch_model()
        try:
            out = _forward(m2.model, x, sigma, ctx)
        finally:
            m2.unpatch_model()
        assert torch.allclose(out, want, atol=1e-4, rtol=1e-4), strength
    assert not torch.allclose(hooked, base, atol=1e-3)
    assert torch.equal(_forward(patcher.model, x, sigma, ctx), base)  # the base model was left untouched

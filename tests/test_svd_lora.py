"""SVD-xt TDD LoRAs: every module of diffusers' SVD UNet, temporal layers included, loads onto ComfyUI's
video UNet through the TDD LoRA Loader (nodes/svd_keys.py, nodes/data/svd_lora_map.json).

The reference architecture is the real diffusers ``UNetSpatioTemporalConditionModel`` (test-only
requirement, tests/requirements.txt) at its default SVD-xt config, on the meta device; the host model is
ComfyUI's SVD UNet at that config, also on the meta device (no weights are allocated except the few
layers whose patched values are checked).
"""
from __future__ import annotations

import importlib
import importlib.util
import json

import pytest
import torch

from harness import REPO, pack_module, run_node

GEN_PATH = REPO / "scripts" / "gen_svd_lora_map.py"
NAMINGS = {  # name of a LoRA module for diffusers path p, per naming style
    "kohya": lambda p: "lora_unet_" + p.replace(".", "_"),
    "peft": lambda p: p,
    "peft_unet": lambda p: "unet." + p,
}
TEMPORAL = ["down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.to_q",
            "down_blocks.0.resnets.0.temporal_res_block.conv1", "mid_block.attentions.0.time_pos_embed.linear_1"]
SPATIAL = ["down_blocks.0.resnets.0.spatial_res_block.conv1", "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k"]


@pytest.fixture(scope="module")
def gen(host):
    """scripts/gen_svd_lora_map.py as a module (after the in-process host owns ``comfy``)."""
    spec = importlib.util.spec_from_file_location("gen_svd_lora_map", GEN_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def svd_keys(host):
    return importlib.import_module(pack_module().__name__ + ".nodes.svd_keys")


@pytest.fixture(scope="module")
def diffusers_modules(gen) -> dict:
    """diffusers SVD-xt module path -> weight shape, for every Linear/Conv (from the real class)."""
    return gen.linear_conv_shapes(gen.diffusers_svd_unet())


@pytest.fixture(scope="module")
def svd_model(gen, host):
    """ComfyUI's SVD-xt UNet (SVD_img2vid) on the meta device, as a ModelPatcher."""
    import comfy.model_detection
    import comfy.model_patcher

    unet = gen.diffusers_svd_unet()
    model = comfy.model_detection.model_config_from_unet_config(gen.comfy_unet_config(unet.config)).get_model(
        {}, device=torch.device("meta"))
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def loader_key_map(svd_keys, model) -> dict:
    import comfy.lora

    return svd_keys.add_svd_keys(model.model, comfy.lora.model_lora_keys_unet(model.model, {}))


def write_svd_lora(path, shapes: dict, naming: str, alpha: float | None, rank: int = 2, seed: int = 0) -> dict:
    """A random-weight LoRA on every diffusers module in ``shapes`` (path -> weight shape); returns
    path -> (up, down) as float32. PEFT files get lora_A/lora_B, kohya ones lora_down/lora_up."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors, factors = {}, {}
    down_name, up_name = ("lora_down", "lora_up") if naming == "kohya" else ("lora_A", "lora_B")
    for p, shape in shapes.items():
        kernel = tuple(shape[2:])
        down = torch.randn((rank, shape[1], *kernel), generator=gen).half()
        up = torch.randn((shape[0], rank, *(1,) * len(kernel)), generator=gen).half()
        name = NAMINGS[naming](p)
        tensors[f"{name}.{down_name}.weight"], tensors[f"{name}.{up_name}.weight"] = down, up
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
        factors[p] = (up.float(), down.float())
    save_file(tensors, str(path))
    return factors


# ------------------------------------------------------------------------------------------ the map

def test_committed_map_is_what_the_generator_derives(gen):
    """nodes/data/svd_lora_map.json is the generator's output for the installed diffusers and ComfyUI."""
    committed = json.loads(gen.OUT.read_text())
    derived = gen.derive_map()
    assert committed["modules"] == derived["modules"]
    assert gen.render(derived) == gen.OUT.read_text(), "stale: run scripts/gen_svd_lora_map.py"


def test_generator_refuses_a_wrong_rule(gen, monkeypatch):
    """The generator's shape/bijection checks catch a mapping that sends a module to the wrong layer."""
    real = gen.comfy_name
    monkeypatch.setattr(gen, "comfy_name", lambda p, names: real(p.replace(".conv1", ".conv2"), names))
    with pytest.raises(gen.MappingError, match="two diffusers modules map onto one ComfyUI module|shapes differ"):
        gen.derive_map()


@pytest.mark.parametrize("naming", sorted(NAMINGS))
def test_every_svd_module_maps_to_a_comfy_weight_of_the_same_shape(naming, diffusers_modules, svd_keys, svd_model):
    assert len(diffusers_modules) == 574
    key_map = loader_key_map(svd_keys, svd_model)
    sd = svd_model.model.state_dict()
    targets = {}
    for p, shape in diffusers_modules.items():
        weight = key_map.get(NAMINGS[naming](p))
        assert weight is not None, f"{naming}: {p} has no key"
        assert tuple(sd[weight].shape) == shape, f"{p} -> {weight}: {tuple(sd[weight].shape)} vs {shape}"
        targets[p] = weight
    assert len(set(targets.values())) == 574
    assert any(".time_stack." in w for w in targets.values()) and any(".time_pos_embed." in w for w in targets.values())


def test_host_alone_maps_a_fraction(diffusers_modules, svd_model):
    """Without the pack's map ComfyUI 0.3.75 reaches only part of the SVD UNet (the README's counts)."""
    import comfy.lora

    stock = comfy.lora.model_lora_keys_unet(svd_model.model, {})
    counts = {naming: sum(NAMINGS[naming](p) in stock for p in diffusers_modules) for naming in NAMINGS}
    assert counts == {"kohya": 204, "peft": 76, "peft_unet": 76}, counts


# ------------------------------------------------------------------------------------------ the loader

@pytest.mark.parametrize("naming,alpha", [("kohya", 1.0), ("peft", None), ("peft_unet", 1.0), ("peft_unet", None)])
def test_loader_patches_all_574_modules(naming, alpha, host, comfy_base, diffusers_modules, svd_keys, svd_model):
    """A random LoRA on all 574 modules: every ComfyUI weight gets its patch, and the patched delta of
    temporal and spatial layers is strength * scale * up @ down (scale = alpha / rank, or 1 without alpha)."""
    import comfy.utils

    name = f"svd_all_{naming}_{'alpha' if alpha else 'noalpha'}.safetensors"
    rank, strength = 2, 0.7
    factors = write_svd_lora(comfy_base / "models" / "loras" / name, diffusers_modules, naming, alpha, rank=rank)
    out = run_node(host, "TDDLoraLoader", model=svd_model, clip=None, lora_name=name, strength_model=strength,
                   strength_clip=1.0)
    patched, info = out[0], out[2]
    assert "574 modules" in info and "SVD: applied as stored" in info, info
    assert ("with alpha" if alpha else "without alpha") in info
    expected = {f"diffusion_model.{t}.weight" for t in svd_keys.svd_module_map().values()}
    assert set(patched.patches) == expected and all(len(v) == 1 for v in patched.patches.values())
    scale = (alpha / rank) if alpha is not None else 1.0
    key_map = loader_key_map(svd_keys, svd_model)
    for p in TEMPORAL + SPATIAL:
        key = key_map[NAMINGS[naming](p)]
        meta = comfy.utils.get_attr(patched.model, key)
        comfy.utils.set_attr_param(patched.model, key, torch.zeros(meta.shape))
        try:
            patched.patch_weight_to_device(key, device_to=torch.device("cpu"))
            delta = comfy.utils.get_attr(patched.model, key)
        finally:
            comfy.utils.set_attr_param(patched.model, key, meta)
            patched.backup.pop(key, None)
        up, down = factors[p]
        want = strength * scale * (up.flatten(1) @ down.flatten(1)).reshape(meta.shape)
        torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-5)


def test_svd_lora_with_modules_the_model_lacks_is_refused(host, comfy_base, diffusers_modules, svd_model):
    """Three modules of a deeper SVD variant (two temporal blocks per attention) have no layer: refused, counted."""
    extra = {f"down_blocks.0.attentions.0.temporal_transformer_blocks.1.attn1.to_{x}": (320, 320) for x in "qkv"}
    write_svd_lora(comfy_base / "models" / "loras" / "svd_deeper.safetensors", {**diffusers_modules, **extra},
                   "peft_unet", None, rank=1)
    with pytest.raises(ValueError, match=r"'svd_deeper.safetensors' does not fit this model: 3 of 577 LoRA modules"):
        run_node(host, "TDDLoraLoader", model=svd_model, clip=None, lora_name="svd_deeper.safetensors",
                 strength_model=1.0, strength_clip=1.0)


def test_svd_lora_on_an_image_model_is_refused(host, comfy_base, diffusers_modules):
    """An SVD LoRA on an SD1.5-class model: refused with the count of unmatched modules, nothing loaded."""
    write_svd_lora(comfy_base / "models" / "loras" / "svd_kohya_r1.safetensors", diffusers_modules, "kohya", 1.0,
                   rank=1)
    model, clip, _ = run_node(host, "TDDTestTinyModel", seed=0)
    with pytest.raises(ValueError, match=r"'svd_kohya_r1.safetensors' does not fit this model: \d+ of 574 LoRA"):
        run_node(host, "TDDLoraLoader", model=model, clip=clip, lora_name="svd_kohya_r1.safetensors",
                 strength_model=1.0, strength_clip=1.0)

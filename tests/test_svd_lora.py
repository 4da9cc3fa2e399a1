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


def test_svd_xt_lora_on_sv3d_is_refused_not_partly_loaded(host, gen, comfy_base, diffusers_modules):
    """SV3D shares SVD's layout but its added-condition embedding takes 256 inputs, not 768: the one
    module of another shape is counted as unmatched instead of being skipped at patch time."""
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = dict(gen.comfy_unet_config(gen.diffusers_svd_unet().config), adm_in_channels=256)
    model = comfy.supported_models.SV3D_u(unet_config).get_model({}, device=torch.device("meta"))
    sv3d = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    write_svd_lora(comfy_base / "models" / "loras" / "svd_for_sv3d.safetensors", diffusers_modules, "peft", None,
                   rank=1)
    with pytest.raises(ValueError, match=r"'svd_for_sv3d.safetensors' does not fit this model: 1 of 574 LoRA modules "
                                         r"have no matching layer \(e.g. add_embedding.linear_1\)"):
        run_node(host, "TDDLoraLoader", model=sv3d, clip=None, lora_name="svd_for_sv3d.safetensors",
                 strength_model=1.0, strength_clip=1.0)


def test_svd_lora_on_an_image_model_is_refused(host, comfy_base, diffusers_modules):
    """An SVD LoRA on an SD1.5-class model: refused with the count of unmatched modules, nothing loaded."""
    write_svd_lora(comfy_base / "models" / "loras" / "svd_kohya_r1.safetensors", diffusers_modules, "kohya", 1.0,
                   rank=1)
    model, clip, _ = run_node(host, "TDDTestTinyModel", seed=0)
    with pytest.raises(ValueError, match=r"'svd_kohya_r1.safetensors' does not fit this model: \d+ of 574 LoRA"):
        run_node(host, "TDDLoraLoader", model=model, clip=clip, lora_name="svd_kohya_r1.safetensors",
                 strength_model=1.0, strength_clip=1.0)


# ------------------------------------------------------------------------------------------ the workflow

SMALL_SVD = {"model_channels": 32, "context_dim": 32, "num_head_channels": 16}  # SVD-xt's layout, narrow
WORKFLOW_LORA = "svd-xt-1-1_tdd_lora_weights.safetensors"  # the name the shipped SVD workflow loads


@pytest.fixture(scope="module")
def small_svd(gen, tiny, diffusers_modules):
    """ComfyUI's SVD model class (SVD_img2vid: EDM v-prediction, video UNet) at SVD-xt's block layout
    with narrow channels, seeded random weights, as a ModelPatcher."""
    import comfy.model_patcher
    import comfy.supported_models

    unet = gen.diffusers_svd_unet()
    config = comfy.supported_models.SVD_img2vid(dict(gen.comfy_unet_config(unet.config), **SMALL_SVD))
    config.unet_config.update(SMALL_SVD)  # the class's extras set 64-channel heads
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    tiny.seeded_init_(model.diffusion_model, 0)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def small_svd_lora(path, svd_keys, model) -> None:
    """A random kohya LoRA with alpha on all 574 diffusers module names, sized for ``model``."""
    sd = model.model.state_dict()
    shapes = {p: tuple(sd[f"diffusion_model.{t}.weight"].shape) for p, t in svd_keys.svd_module_map().items()}
    write_svd_lora(path, shapes, "kohya", 1.0, rank=2, seed=1)


def test_svd_workflow_runs_with_the_lora_on_a_small_svd_model(host, comfy_base, svd_keys, small_svd):
    """The shipped SVD workflow's graph (TDD LoRA Loader -> VideoLinearCFGGuidance -> SamplerCustom with
    TDD Scheduler / TDD Sampler at its settings) runs on a small SVD-configured model with an SVD LoRA on
    all 574 modules: every step is taken, and the LoRA changes the video."""
    import comfy.utils

    small_svd_lora(comfy_base / "models" / "loras" / "svd_small.safetensors", svd_keys, small_svd)
    out = run_node(host, "TDDLoraLoader", model=small_svd, clip=None, lora_name="svd_small.safetensors",
                   strength_model=1.0, strength_clip=1.0)
    assert len(out[0].patches) == 574, out[2]
    frames, ctx = 2, SMALL_SVD["context_dim"]
    gen = torch.Generator().manual_seed(0)
    extra = {"motion_bucket_id": 127, "fps": 6, "augmentation_level": 0.0,
             "concat_latent_image": torch.randn((1, 4, 8, 8), generator=gen)}
    positive = [[torch.randn((1, 1, ctx), generator=gen), dict(extra)]]
    negative = [[torch.zeros((1, 1, ctx)), dict(extra, concat_latent_image=torch.zeros((1, 4, 8, 8)))]]
    latent = {"samples": torch.zeros((frames, 4, 8, 8))}

    def video(model):
        (guided,) = run_node(host, "VideoLinearCFGGuidance", model=model, min_cfg=1.0)
        (sigmas,) = run_node(host, "TDDScheduler", model=guided, steps=4, non_equidistant=False, denoise=1.0)
        (sampler,) = run_node(host, "TDDSampler", eta=0.3, x0_clip_steps=0)
        steps = []
        comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: steps.append(value))
        try:
            samples, _ = run_node(host, "SamplerCustom", model=guided, add_noise=True, noise_seed=42, cfg=2.0,
                                  positive=positive, negative=negative, sampler=sampler, sigmas=sigmas,
                                  latent_image=latent)
        finally:
            comfy.utils.set_progress_bar_global_hook(None)
        assert len(sigmas) == 5 and steps[-1] == 4, steps
        return samples["samples"]

    with_lora, without = video(out[0]), video(small_svd)
    assert with_lora.shape == (frames, 4, 8, 8) and torch.isfinite(with_lora).all()
    assert not torch.allclose(with_lora, without)


def test_svd_workflow_with_the_lora_passes_server_validation(server, comfy_base, svd_keys, small_svd):
    """workflows/svd_tdd_img2vid.json with an SVD LoRA file of the name it loads: the server's prompt
    validation accepts the LoRA node; only the checkpoint and the input image (not shipped) are missing."""
    import workflow_tools as wt

    small_svd_lora(comfy_base / "models" / "loras" / WORKFLOW_LORA, svd_keys, small_svd)
    api = wt.to_api(wt.load(REPO / "workflows" / "svd_tdd_img2vid.json"), server.object_info())
    assert any(n["class_type"] == "TDDLoraLoader" and n["inputs"]["lora_name"] == WORKFLOW_LORA for n in api.values())
    status, payload = server.queue(api)
    assert status == 400, payload
    errors = {(ne["class_type"], (e.get("extra_info") or {}).get("input_name"))
              for ne in payload["node_errors"].values() for e in ne["errors"]}
    assert errors == {("ImageOnlyCheckpointLoader", "ckpt_name"), ("LoadImage", "image")}, errors

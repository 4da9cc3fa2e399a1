"""A tiny, random-weight SD1.5-style text-to-image model built only from the host's own classes.

Test-only: never shipped to users.  Everything here runs inside a ComfyUI process (the ``comfy``
package must be importable).  Weights are seeded, so one seed always gives one model.

- UNet: ``comfy.supported_models.SD15`` with a shrunken ``unet_config`` -> ``get_model()`` ->
  ``comfy.model_patcher.ModelPatcher`` (what ``CheckpointLoaderSimple`` hands out, only smaller).
- CLIP: the host's SD1 CLIP classes (``comfy.sd1_clip``) with a small text-model config and the
  host's bundled CLIP tokenizer (``comfy/sd1_tokenizer``; nothing is downloaded), in ``comfy.sd.CLIP``.
- VAE: ``comfy.sd.VAE`` from an ``AutoencoderKL`` config with few channels (8x down/up-scale,
  4 latent channels).

ComfyUI's ``ops`` skip weight initialisation (``torch.empty``), so every parameter is filled here
from a ``torch.Generator`` seeded with ``seed``.
"""
from __future__ import annotations

import logging
import math
import os

import torch

log = logging.getLogger(__name__)

LATENT_CHANNELS = 4
CONTEXT_DIM = 64

# Shrunken SD1.5 UNet (same key layout as SD1.5, so kohya/diffusers LoRA key maps apply).
TINY_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": CONTEXT_DIM,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
TINY_NUM_HEADS = 2

# Small CLIP-L-shaped text model (vocabulary and 77 positions kept for the bundled tokenizer).
TINY_TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 49407,
    "hidden_act": "quick_gelu",
    "hidden_size": CONTEXT_DIM,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4 * CONTEXT_DIM,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "pad_token_id": 1,
    "projection_dim": CONTEXT_DIM,
    "torch_dtype": "float32",
    "vocab_size": 49408,
}

# Small AutoencoderKL: four levels -> 8x scale factor; channels a multiple of 32 (GroupNorm(32)).
TINY_VAE_CONFIG = {
    "params": {
        "embed_dim": LATENT_CHANNELS,
        "ddconfig": {
            "double_z": True,
            "z_channels": LATENT_CHANNELS,
            "resolution": 64,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 32,
            "ch_mult": [1, 1, 1, 1],
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
    }
}


def seeded_init_(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter of ``module`` deterministically from ``seed`` (in name order).

    Matrices/convolutions: N(0, 1/fan_in); 1-D weights (norms): 1; biases: small noise;
    embeddings: N(0, 0.02).  Scalars are left alone.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim == 0:
                continue
            if name.endswith("bias"):
                val = torch.randn(p.shape, generator=gen) * 0.01
            elif p.ndim == 1:
                val = torch.ones(p.shape)
            elif "embedding" in name:
                val = torch.randn(p.shape, generator=gen) * 0.02
            else:
                fan_in = math.prod(p.shape[1:])
                val = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
            p.copy_(val.to(device=p.device, dtype=p.dtype))


def _host_builders():
    """The pack's host-class builders (``nodes/demo_model.py``, loaded by path: the pack's ``nodes``
    package name is taken by ComfyUI's ``nodes`` module)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "nodes" / "demo_model.py"
    spec = importlib.util.spec_from_file_location("tdd_pack_demo_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_tiny_unet(seed: int = 0, family: str = "SD15", model_type: str | None = None, **config_overrides):
    """The tiny UNet as a ``comfy.model_patcher.ModelPatcher`` (like a checkpoint loader's MODEL):
    SD1.5 by default; ``family``/``model_type``/``config_overrides`` make SD2.x or SDXL-class variants."""
    return _host_builders().build_unet(dict(TINY_UNET_CONFIG, **config_overrides), TINY_NUM_HEADS, seed=seed,
                                       init=seeded_init_, family=family, model_type=model_type)


def build_tiny_clip(seed: int = 0):
    """A ``comfy.sd.CLIP`` with the host's SD1 CLIP classes and bundled tokenizer, tiny text model."""
    return _host_builders().build_clip(TINY_TEXT_CONFIG, seed=seed + 1, init=seeded_init_)


def build_tiny_vae(seed: int = 0):
    """A small ``comfy.sd.VAE`` (AutoencoderKL, 4 latent channels, 8x scale)."""
    return _host_builders().build_vae(TINY_VAE_CONFIG, seed=seed + 2, init=seeded_init_)


def build_tiny_sd15(seed: int = 0):
    """-> (model_patcher, clip, vae) of the tiny SD1.5-style model for ``seed``."""
    return build_tiny_unet(seed), build_tiny_clip(seed), build_tiny_vae(seed)


# ----------------------------------------------------------------------------------------------
# LoRA files
# ----------------------------------------------------------------------------------------------

def _save(path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {})


def tiny_lora_targets(model_patcher) -> dict:
    """kohya LoRA prefix (``lora_unet_<diffusers path with _>``) -> (model key, weight shape) for
    every 2-D/4-D weight of the tiny UNet that ComfyUI's ``model_lora_keys_unet`` maps."""
    import comfy.lora
    import comfy.utils

    model = model_patcher.model
    sd = model.state_dict()
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    diffusers_keys = comfy.utils.unet_to_diffusers(model.model_config.unet_config)
    out = {}
    for dkey in sorted(diffusers_keys):
        if not dkey.endswith(".weight"):
            continue
        prefix = "lora_unet_" + dkey[: -len(".weight")].replace(".", "_")
        mkey = key_map.get(prefix)
        if mkey is None or mkey not in sd:
            continue
        shape = tuple(sd[mkey].shape)
        if len(shape) not in (2, 4):
            continue
        out[prefix] = (mkey, shape)
    return out


def write_kohya_lora(path, model_patcher, rank: int = 4, seed: int = 0, strength_of_up: float = 0.5,
                     only: str | None = None) -> list[str]:
    """Write a kohya-style LoRA for the tiny model (``.lora_down.weight``, ``.lora_up.weight``,
    ``.alpha`` per module) whose keys all map through ``comfy.lora.model_lora_keys_unet``.

    ``only``: restrict to prefixes containing this substring (e.g. ``"attn2"``).
    Up weights are non-zero (scaled by ``strength_of_up``) so the LoRA changes the output.
    Returns the list of LoRA prefixes written.
    """
    gen = torch.Generator().manual_seed(int(seed))
    tensors = {}
    targets = tiny_lora_targets(model_patcher)
    if only:
        targets = {k: v for k, v in targets.items() if only in k}
    for prefix, (_mkey, shape) in targets.items():
        out_dim, in_dim = shape[0], math.prod(shape[1:])
        r = min(rank, out_dim, in_dim)
        if len(shape) == 4:
            down = torch.randn((r, shape[1], shape[2], shape[3]), generator=gen) / math.sqrt(in_dim)
            up = torch.randn((out_dim, r, 1, 1), generator=gen) * strength_of_up / math.sqrt(r)
        else:
            down = torch.randn((r, in_dim), generator=gen) / math.sqrt(in_dim)
            up = torch.randn((out_dim, r), generator=gen) * strength_of_up / math.sqrt(r)
        tensors[prefix + ".lora_down.weight"] = down
        tensors[prefix + ".lora_up.weight"] = up
        tensors[prefix + ".alpha"] = torch.tensor(float(r))
    _save(path, tensors, {"ss_network_module": "networks.lora", "tdd_test": "tiny_sd15"})
    log.info("wrote %d LoRA modules to %s", len(targets), path)
    return sorted(targets)


# kind -> (down key, up key, has .alpha, {module prefix: (out, in)})
_FOREIGN_LORAS = {
    "sdxl": ("lora_down.weight", "lora_up.weight", True, {
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q": (640, 640),
        "lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k": (1280, 2048),
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2": (1280, 5120),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280),
    }),
    "flux": ("lora_A.weight", "lora_B.weight", False, {
        "transformer.single_transformer_blocks.0.attn.to_q": (3072, 3072),
        "transformer.transformer_blocks.0.attn.to_k": (3072, 3072),
        "transformer.transformer_blocks.0.ff.net.0.proj": (12288, 3072),
    }),
}


def write_foreign_lora(path, kind: str = "sdxl", rank: int = 4, seed: int = 0) -> list[str]:
    """Write a LoRA for another architecture (none of its keys map onto the tiny SD1.5 model).

    ``kind="sdxl"``: kohya keys of SDXL-only modules (input_blocks 4..8 transformer_blocks 1+,
    ``lora_te2_``); ``kind="flux"``: PEFT keys of FLUX single/double blocks.
    Returns the key prefixes written.
    """
    if kind not in _FOREIGN_LORAS:
        raise ValueError(f"unknown kind {kind!r}")
    down_name, up_name, with_alpha, prefixes = _FOREIGN_LORAS[kind]
    gen = torch.Generator().manual_seed(int(seed))
    tensors = {}
    for p, (o, i) in prefixes.items():
        tensors[f"{p}.{down_name}"] = torch.randn((rank, i), generator=gen) * 0.01
        tensors[f"{p}.{up_name}"] = torch.randn((o, rank), generator=gen) * 0.01
        if with_alpha:
            tensors[p + ".alpha"] = torch.tensor(float(rank))
    _save(path, tensors, {"tdd_test": kind})
    return sorted(prefixes)


def write_corrupt_file(path, nbytes: int = 4096, seed: int = 0) -> None:
    """Random bytes under a LoRA-like name (not a valid safetensors file)."""
    gen = torch.Generator().manual_seed(int(seed))
    data = torch.randint(0, 256, (nbytes,), generator=gen, dtype=torch.uint8).numpy().tobytes()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)

"""The embedded demo model: a tiny latent text-to-image family built only from the host's classes.

- UNet: ComfyUI's SD1.5 UNet (``comfy.supported_models.SD15``) at a small width, eps-prediction on
  the SD1.5 noise schedule, on 8x8x4 latents of 64x64 images;
- text encoder: ComfyUI's SD1 CLIP classes with a small text-model config and the host's bundled
  CLIP tokenizer (nothing is downloaded);
- VAE: ComfyUI's ``AutoencoderKL`` with few channels (8x down-scaling, 4 latent channels), so the
  stock EmptyLatentImage, CLIPTextEncode, KSampler and VAEDecode work unchanged.

This module imports ComfyUI only (no relative imports), so the trainer can load it by file path as
its teacher factory (``--teacher nodes/demo_model.py:load_demo``). Model card: docs/demo_model.md.
"""
from __future__ import annotations

import math
import os

import torch

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo")
WEIGHTS_DIR = os.path.join(DEMO_DIR, "weights")
LORA_DIR = os.path.join(DEMO_DIR, "loras")  # listed among ComfyUI's LoRAs; holds demo_tdd_lora.safetensors
FILES = {"unet": "demo_unet.safetensors", "clip": "demo_clip.safetensors", "vae": "demo_vae.safetensors"}
CONTEXT_DIM = 64
LATENT_CHANNELS = 4

UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 8, "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None, "model_channels": 64,
    "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1,
    "use_linear_in_transformer": True, "context_dim": CONTEXT_DIM, "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
NUM_HEADS = 4

TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": CONTEXT_DIM, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 4 * CONTEXT_DIM, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 4,
    "num_hidden_layers": 3, "pad_token_id": 1, "projection_dim": CONTEXT_DIM, "torch_dtype": "float32",
    "vocab_size": 49408,
}

VAE_CONFIG = {"params": {"embed_dim": LATENT_CHANNELS, "ddconfig": {
    "double_z": True, "z_channels": LATENT_CHANNELS, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}


class DemoModelError(ValueError):
    """A demo weight file is missing or unreadable; the message names it and the fix."""


def init_(module: torch.nn.Module, seed: int) -> None:
    """Deterministic initialisation (ComfyUI's ops leave weights uninitialised): N(0, 1/fan_in)
    matrices, unit norms, zero biases, N(0, 0.02) embeddings; zero for the UNet's output conv."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            elif "embedding" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:])))


def build_unet(unet_config: dict, num_heads: int, state_dict: dict | None = None, seed: int = 0, init=init_,
               family: str = "SD15", model_type: str | None = None):
    """A host UNet at ``unet_config`` as a ModelPatcher: ``state_dict`` or seeded ``init``.

    ``family`` names the host's model config (``SD15``, ``SD20``, ``SDXL``...); ``model_type``
    (e.g. ``V_PREDICTION``) overrides the parameterisation the config would infer."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = getattr(comfy.supported_models, family)(dict(unet_config))
    config.unet_config.update(num_heads=num_heads, num_head_channels=-1)  # the configs' extras set 8 heads
    config.set_inference_dtype(torch.float32, None)
    if model_type is None:
        model = config.get_model({}, "model.", device=torch.device("cpu"))
    else:
        model = comfy.model_base.BaseModel(config, model_type=getattr(comfy.model_base.ModelType, model_type),
                                           device=torch.device("cpu"))
    if state_dict is None:
        init(model.diffusion_model, seed)
    else:
        model.diffusion_model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_clip(text_config: dict, state_dict: dict | None = None, seed: int = 0, init=init_):
    """ComfyUI's SD1 CLIP classes with ``text_config`` and the bundled tokenizer, as a ``comfy.sd.CLIP``."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    class SmallClipModel(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, textmodel_json_config=dict(text_config),
                             return_projected_pooled=False, model_options=model_options)

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    target.params = {"clip_model": SmallClipModel}
    clip = comfy.sd.CLIP(target, embedding_directory=None, model_options={"dtype": torch.float32})
    if state_dict is None:
        init(clip.cond_stage_model, seed)
    else:
        clip.cond_stage_model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=False)
    return clip


def build_vae(vae_config: dict, state_dict: dict | None = None, seed: int = 0, init=init_):
    """ComfyUI's ``AutoencoderKL`` at ``vae_config`` as a ``comfy.sd.VAE``."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    if state_dict is None:
        ae = AutoencoderKL(**vae_config["params"])
        init(ae, seed)
        state_dict = ae.state_dict()
    return comfy.sd.VAE(sd={k: v.float() for k, v in state_dict.items()}, config=vae_config, dtype=torch.float32)


def read_weights(path: str) -> dict:
    import safetensors.torch

    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise DemoModelError(f"demo model file '{path}' is missing; restore it with `git checkout -- demo/weights` "
                             "or rebuild it with `make demo-model`")
    try:
        return safetensors.torch.load_file(path)
    except Exception as e:
        raise DemoModelError(f"demo model file '{name}' is corrupt ({type(e).__name__}: {str(e).splitlines()[0]}); "
                             "restore it with `git checkout -- demo/weights` or rebuild it with `make demo-model`") from e


def build(weights_dir: str | None = WEIGHTS_DIR, seed: int = 0):
    """-> (ModelPatcher, CLIP, VAE); random (seeded) weights when ``weights_dir`` is None."""
    sds = {part: None if weights_dir is None else read_weights(os.path.join(weights_dir, f))
           for part, f in FILES.items()}
    return (build_unet(UNET_CONFIG, NUM_HEADS, sds["unet"], seed), build_clip(TEXT_CONFIG, sds["clip"], seed + 1),
            build_vae(VAE_CONFIG, sds["vae"], seed + 2))


def load_demo():
    """Teacher factory for ``trainer/distill.py --teacher nodes/demo_model.py:load_demo``."""
    return build(WEIGHTS_DIR)


def state_dicts(model, clip, vae) -> dict[str, dict]:
    """The three weight sets as saved in ``demo/weights`` (fp16 to stay small)."""
    half = lambda sd: {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}
    return {"unet": half(model.model.diffusion_model.state_dict()), "clip": half(clip.cond_stage_model.state_dict()),
            "vae": half(vae.first_stage_model.state_dict())}

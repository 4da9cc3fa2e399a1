"""Tiny random-weight models of the families ComfyUI 0.33 runs, built only from the host's own classes.

Test-only: never shipped. For each family of :data:`FAMILIES`:

- the diffusion model: ``comfy.supported_models.<Config>(unet_config).get_model({})`` with small
  dimensions, weights filled with seeded ``normal * 0.02`` (the host's ops skip initialisation), in
  a ``ModelPatcher`` - what the family's UNETLoader hands out, only smaller;
- the text side: these families' text encoders (T5-XXL, Qwen2.5-VL, Gemma, Llama...) cannot be built
  small here, so every family gets the host's SD1 CLIP classes at a small size whose states have the
  family's conditioning shape (width = the model's text width; a pooled vector only where the family
  takes one). This is the "test-only text encoder" the issue allows; it is needed for every family here;
- the VAE: the host's own classes, small - ``AutoencoderKL`` with the family's latent channels for
  image families (8x), the Wan 2.1 causal video VAE (``comfy.ldm.wan.vae.WanVAE``, 8x spatial, 4x
  temporal, 16 channels) for families with 5-D latents (Wan, Qwen-Image, HunyuanVideo).

One seed always gives one model.
"""
from __future__ import annotations

import logging
import math
import time

import torch

log = logging.getLogger(__name__)

TEXT_DIM = 32   # text states' width for every family here (the tiny CLIP's hidden size)

#: family -> (host config class, unet_config, takes a pooled vector, test resolution in pixels)
FAMILIES = {
    "sd3": ("SD3", {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
                    "adm_in_channels": TEXT_DIM, "pos_embed_max_size": 16, "num_patches": 256,
                    "context_embedder_config": {"target": "torch.nn.Linear",
                                                "params": {"in_features": TEXT_DIM, "out_features": 128}},
                    "pos_embed_scaling_factor": None, "pos_embed_offset": None, "qk_norm": None,
                    "x_block_self_attn_layers": []}, True, 32),
    "flux2": ("Flux2", {"image_model": "flux2", "in_channels": 128, "out_channels": 128, "patch_size": 1,
                        "vec_in_dim": None, "context_in_dim": TEXT_DIM, "hidden_size": 64, "mlp_ratio": 3.0,
                        "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 8, 8, 8],
                        "theta": 2000, "qkv_bias": False, "guidance_embed": True, "global_modulation": True,
                        "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index",
                        "ref_index_scale": 10.0, "txt_ids_dims": [3]}, False, 32),
    "qwen_image": ("QwenImage", {"image_model": "qwen_image", "num_layers": 2, "attention_head_dim": 16,
                                 "num_attention_heads": 2, "joint_attention_dim": TEXT_DIM,
                                 "axes_dims_rope": (4, 6, 6)}, False, 32),
    "lumina2": ("Lumina2", {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "n_layers": 2,
                            "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "multiple_of": 16,
                            "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": TEXT_DIM,
                            "axes_dims": [8, 12, 12], "axes_lens": [300, 64, 64]}, False, 32),
    # (Z-Image's modulation needs a width of 256 or more)
    "zimage": ("ZImage", {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "n_layers": 2,
                          "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "multiple_of": 16,
                          "ffn_dim_multiplier": 8.0 / 3.0, "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": TEXT_DIM,
                          "axes_dims": [32, 48, 48], "axes_lens": [300, 64, 64], "rope_theta": 256.0,
                          "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32}, False, 32),
    "chroma": ("Chroma", {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": TEXT_DIM,
                          "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 4, "depth": 1, "depth_single_blocks": 1,
                          "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True, "in_dim": 64, "out_dim": 64,
                          "hidden_dim": 32, "n_layers": 1, "patch_size": 2, "txt_ids_dims": [], "vec_in_dim": None},
               False, 32),
    "wan21": ("WAN21_T2V", {"image_model": "wan2.1", "model_type": "t2v", "dim": 32, "ffn_dim": 64, "freq_dim": 32,
                            "text_dim": TEXT_DIM, "num_heads": 2, "num_layers": 2, "in_dim": 16, "out_dim": 16},
              False, 16),
    "hunyuan_video": ("HunyuanVideo", {"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16,
                                       "vec_in_dim": TEXT_DIM, "context_in_dim": TEXT_DIM, "hidden_size": 64,
                                       "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
                                       "axes_dim": [8, 12, 12], "theta": 256, "patch_size": [1, 2, 2],
                                       "qkv_bias": True, "guidance_embed": True, "byt5": False, "meanflow": False,
                                       "use_cond_type_embedding": False, "vision_in_dim": None,
                                       "meanflow_sum": False}, True, 16),
    "auraflow": ("AuraFlow", {"in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 64, "n_layers": 2,
                              "n_double_layers": 1, "n_heads": 2, "global_conddim": 64, "cond_seq_dim": TEXT_DIM,
                              "max_seq": 256}, False, 32),
}
#: Tiny models of families the trainer refuses (same fields as FAMILIES): Wan 2.1 image-to-video, whose
#: input concatenates an image latent (its conditioning needs more than a prompt).
UNSUPPORTED = {
    "wan21_i2v": ("WAN21_I2V", dict(FAMILIES["wan21"][1], model_type="i2v", in_dim=36), False, 16),
}
#: Families whose real text encoders (LLMs) give states as long as the prompt, with an attention mask:
#: their test encoder does the same (the host's ``attention_mask`` output), where the others' states
#: are padded to 77 tokens as their T5 and CLIP encoders pad.
LLM_TEXT = {"flux2", "qwen_image", "lumina2", "zimage", "hunyuan_video"}
#: Families whose latents are 5-D (a frame axis): the tiny Wan video VAE encodes them.
VIDEO_VAE = {"wan21", "wan21_i2v", "qwen_image", "hunyuan_video"}
#: Families that are video models (clips of several frames), as opposed to 5-D image latents (Qwen-Image).
VIDEO = {"wan21", "hunyuan_video"}


def fill_(module: torch.nn.Module, seed: int) -> None:
    """Every parameter of ``module`` from a seeded normal, in name order (the host's ops leave weights
    uninitialised): matrices and kernels ``N(0, 1/fan_in)`` (so activations keep their scale and the
    output depends on the prompt: with ``N(0, 0.02)`` the tiny models' distillation loss is ~1e-8),
    1-D weights of norms 1, other vectors (biases, embeddings) ``N(0, 0.02)``; float buffers saved in
    the state dict too (a checkpoint would fill them)."""
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim == 0:
                continue
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:])))
            elif "norm" in name and not name.endswith("bias"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        state = set(module.state_dict())
        for name, b in sorted(module.named_buffers(), key=lambda kv: kv[0]):
            if name in state and b.is_floating_point():   # weights kept as buffers (SD3's pos_embed)
                b.copy_(torch.randn(b.shape, generator=gen) * 0.02)


def build_model(family: str, seed: int = 0, device: str = "cpu"):
    """The family's diffusion model from the host's classes, as a ``ModelPatcher``."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config_name, unet_config, _, _ = spec(family)
    config = getattr(comfy.supported_models, config_name)(dict(unet_config))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "model.", device=torch.device(device))
    if device != "meta":
        fill_(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_clip(family: str, seed: int = 0):
    """The test text encoder: the host's SD1 CLIP classes (bundled tokenizer) with ``TEXT_DIM`` states;
    the pooled output only for families that take one; for :data:`LLM_TEXT` families, the states of the
    prompt's own tokens (not padded to 77) and their attention mask, as LLM encoders give them."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    pooled, llm = spec(family)[2], family in LLM_TEXT
    text_config = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
                   "eos_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": TEXT_DIM,
                   "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 2 * TEXT_DIM,
                   "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
                   "num_attention_heads": 2, "num_hidden_layers": 1, "pad_token_id": 1, "projection_dim": TEXT_DIM,
                   "torch_dtype": "float32", "vocab_size": 49408}

    class FamilyClipModel(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, textmodel_json_config=dict(text_config),
                             return_projected_pooled=False, return_attention_masks=llm, model_options=model_options)

    class FamilyClip(comfy.sd1_clip.SD1ClipModel):
        def encode_token_weights(self, token_weight_pairs):
            out = super().encode_token_weights(token_weight_pairs)
            if llm:  # an LLM's output: the prompt's own tokens (up to CLIP's end token), all unmasked
                n = int(out[2]["attention_mask"].sum())
                out = (out[0][:, :n], out[1], {**out[2], "attention_mask": out[2]["attention_mask"][:, :n]})
            return out if pooled else (out[0], None, *out[2:])

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, FamilyClip)
    target.params = {"clip_model": FamilyClipModel}
    clip = comfy.sd.CLIP(target, embedding_directory=None, model_options={"dtype": torch.float32})
    gen = torch.Generator().manual_seed(int(seed) + 1)
    with torch.no_grad():
        for name, p in sorted(clip.cond_stage_model.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim == 0:
                continue
            if p.ndim == 1:
                p.fill_(1.0 if "weight" in name else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return clip


def build_vae(family: str, seed: int = 0):
    """A small host VAE with the family's latent layout (see the module doc)."""
    import comfy.sd

    gen_seed = int(seed) + 2
    if family in VIDEO_VAE:
        from comfy.ldm.wan.vae import WanVAE

        vae = WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                     temperal_downsample=[False, True, True], dropout=0.0)
        _fill_vae(vae, gen_seed)
        return comfy.sd.VAE(sd=vae.state_dict())
    from comfy.ldm.models.autoencoder import AutoencoderKL

    channels = _latent_channels(family)
    config = {"params": {"embed_dim": channels, "ddconfig": {
        "double_z": True, "z_channels": channels, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
        "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}
    ae = AutoencoderKL(**config["params"])
    _fill_vae(ae, gen_seed)
    return comfy.sd.VAE(sd=ae.state_dict(), config=config, dtype=torch.float32)


def _fill_vae(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1 or "gamma" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:])))


def _latent_channels(family: str) -> int:
    import comfy.supported_models

    return int(getattr(comfy.supported_models, spec(family)[0]).latent_format.latent_channels)


def build(family: str, seed: int = 0):
    """-> (ModelPatcher, CLIP, VAE) of the tiny ``family``."""
    return build_model(family, seed), build_clip(family, seed), build_vae(family, seed)


def resolution(family: str) -> int:
    return spec(family)[3]


def spec(family: str) -> tuple:
    """(host config class, unet_config, takes a pooled vector, test resolution) of a supported or refused family."""
    return FAMILIES[family] if family in FAMILIES else UNSUPPORTED[family]


def pause_until_cancelled(patcher, call: int, timeout: float = 120.0) -> None:
    """The diffusion model's ``call``-th forward (counted from 1, once) waits until ComfyUI's interrupt flag
    is set (what the Cancel button's ``POST /interrupt`` does), then goes on: a test cancels a run at a
    known point however fast or slow the machine is. Raises after ``timeout`` seconds without a cancel."""
    import comfy.model_management as mm

    calls = {"n": 0}

    def hook(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] != call:
            return None
        log.info("test model: forward call %d waits for a cancel", call)
        deadline = time.monotonic() + timeout
        while not mm.processing_interrupted():
            if time.monotonic() > deadline:
                raise RuntimeError(f"test model: no cancel within {timeout:g} s of forward call {call}")
            time.sleep(0.01)
        return None
    patcher.model.diffusion_model.register_forward_pre_hook(hook, with_kwargs=True)

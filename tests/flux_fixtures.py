"""A reduced FLUX.1 built only from the host's own FLUX classes, for the trainer's FLUX tests.

- transformer: ``comfy.supported_models.Flux`` / ``comfy.model_base.Flux`` (``comfy.ldm.flux``) at width
  64 (4 heads of 16), 2 double + 2 single blocks, guidance embedding on: FLUX.1-dev's architecture, smaller;
- text encoders: the host's ``FluxClipModel`` pair (``sd1_clip.SDClipModel`` CLIP-L and the T5 class of
  ``comfy.text_encoders.t5``) at small configs, with the host's bundled CLIP and T5 tokenizers
  (``FluxTokenizer``: 256 T5 tokens per prompt);
- VAE: the host's FLUX preview autoencoder (TAESD with 16 latent channels, loaded by ``comfy.sd.VAE``
  from one state dict with FLUX's ``vae_scale`` / ``vae_shift``, as VAELoader loads ``taef1``), so the
  latents are in FLUX's real latent space and the host's ``Flux`` latent format scales and shifts them.

Also usable as a ``--teacher`` factory: ``--teacher tests/flux_fixtures.py:tiny_flux``.

:func:`save_flux_files` writes the reduced model as an all-in-one checkpoint and as the separate files
ComfyUI's UNETLoader / DualCLIPLoader / VAELoader read. The host's loaders hard-code FLUX.1's sizes
(24 heads of 128 channels, the T5-XXL and CLIP-L configs); :func:`reduced_flux_host` teaches them the
reduced sizes for the duration of a test, so everything else - reading the files, prefix handling,
detection of the model and text-encoder types, the host's FLUX and text-encoder classes - is the real path.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer.models import ensure_host  # noqa: E402

WIDTH, HEADS, AXES = 64, 4, [4, 6, 6]        # head dim 16 = sum(AXES)
TEXT_DIM = 64                                # CLIP-L pooled width = T5 width here
TEXT_TOKENS = 16                             # T5 states per prompt (FLUX: 256)
RESOLUTION = 32                              # 32 px -> 4x4x16 latent -> 2x2 patches
FLUX_VAE_SCALE, FLUX_VAE_SHIFT = 0.3611, 0.1159  # comfy.latent_formats.Flux (what VAELoader gives taef1)

UNET_CONFIG = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": TEXT_DIM,
               "context_in_dim": TEXT_DIM, "hidden_size": WIDTH, "mlp_ratio": 4.0, "num_heads": HEADS, "depth": 2,
               "depth_single_blocks": 2, "axes_dim": AXES, "theta": 10000, "qkv_bias": True, "guidance_embed": True,
               "txt_ids_dims": []}  # FLUX.1 has no text position ids (ComfyUI 0.33 asks for the field)
#: FLUX.1-dev's own transformer config (for meta-device tests; no weights).
FLUX_DEV_CONFIG = dict(UNET_CONFIG, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, num_heads=24, depth=19,
                       depth_single_blocks=38, axes_dim=[16, 56, 56])
CLIP_CONFIG = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": TEXT_DIM, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 2 * TEXT_DIM, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 2, "num_hidden_layers": 2,
    "pad_token_id": 1, "projection_dim": TEXT_DIM, "torch_dtype": "float32", "vocab_size": 49408}
T5_CONFIG = {
    "d_ff": 2 * TEXT_DIM, "d_kv": 16, "d_model": TEXT_DIM, "decoder_start_token_id": 0, "dropout_rate": 0.0,
    "eos_token_id": 1, "dense_act_fn": "gelu_pytorch_tanh", "initializer_factor": 1.0, "is_encoder_decoder": True,
    "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "num_decoder_layers": 2, "num_heads": 4,
    "num_layers": 2, "output_past": True, "pad_token_id": 0, "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False, "vocab_size": 32128}


def _init(module, seed):
    import trainer_fixtures
    trainer_fixtures.tiny_module().seeded_init_(module, seed)


def build_unet(seed: int = 0, config: dict | None = None, device: str = "cpu"):
    """The host's FLUX transformer at ``config`` (default: reduced) as a ModelPatcher with seeded weights."""
    ensure_host("cpu")
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.Flux(dict(config or UNET_CONFIG))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "model.", device=torch.device(device))
    if device != "meta":
        _init(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def _tiny_flux_clip_class():
    import comfy.sd1_clip
    import comfy.text_encoders.flux
    import comfy.text_encoders.t5

    class TinyFluxClip(comfy.text_encoders.flux.FluxClipModel):
        """The host's FLUX text-encoder pair (CLIP-L + T5) at small configs."""

        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, return_projected_pooled=False,
                                                     textmodel_json_config=dict(CLIP_CONFIG), model_options=model_options)
            self.t5xxl = comfy.sd1_clip.SDClipModel(
                device=device, dtype=dtype, textmodel_json_config=dict(T5_CONFIG), special_tokens={"end": 1, "pad": 0},
                model_class=comfy.text_encoders.t5.T5, model_options={**model_options, "model_name": "t5xxl"})
            self.dtypes = {dtype}
    return TinyFluxClip


def build_clip(seed: int = 0):
    """A ``comfy.sd.CLIP`` with the host's FluxTokenizer and the reduced FLUX text encoders."""
    ensure_host("cpu")
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.flux

    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer, _tiny_flux_clip_class())
    clip = comfy.sd.CLIP(target, embedding_directory=None, model_options={"dtype": torch.float32})
    _init(clip.cond_stage_model, seed + 1)
    clip.set_tokenizer_option("t5xxl_min_length", TEXT_TOKENS)  # the host pads FLUX prompts to 256 T5 tokens
    return clip


def vae_state_dict(seed: int = 0, latent_channels: int = 16) -> dict:
    """A FLUX preview autoencoder (TAESD, 16 latent channels) with FLUX's latent scale and shift stored
    (``latent_channels=4``: an SD-style one, for the wrong-VAE test)."""
    ensure_host("cpu")
    from comfy.taesd.taesd import TAESD

    ae = TAESD(latent_channels=latent_channels)
    _init(ae, seed + 2)
    sd = {k: v.detach().clone() for k, v in ae.state_dict().items()}
    sd["vae_scale"], sd["vae_shift"] = torch.tensor(FLUX_VAE_SCALE), torch.tensor(FLUX_VAE_SHIFT)
    return sd


def build_vae(seed: int = 0):
    import comfy.sd
    return comfy.sd.VAE(sd=vae_state_dict(seed))


def tiny_flux(seed: int | None = None):
    """(ModelPatcher, CLIP, VAE) of the reduced FLUX (seed from $TDD_TINY_SEED, default 0)."""
    if seed is None:
        seed = int(os.environ.get("TDD_TINY_SEED", "0"))
    return build_unet(seed), build_clip(seed), build_vae(seed)


def meta_flux_dev():
    """FLUX.1-dev's full transformer on the meta device (host classes, no memory)."""
    return build_unet(config=FLUX_DEV_CONFIG, device="meta").model


# ------------------------------------------------------------------------------------------------
# the file forms
# ------------------------------------------------------------------------------------------------
def save_flux_files(folder, seed: int = 0, unet_dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """The reduced FLUX as ``{"checkpoint", "unet", "clip_l", "t5xxl", "vae"}`` safetensors files:
    an all-in-one checkpoint (``model.diffusion_model.`` / ``text_encoders.`` / ``vae.`` keys) and the
    separate files (diffusion model in ``unet_dtype``, CLIP-L, T5, VAE)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    patcher, clip, _ = tiny_flux(seed)
    full = {k: v.contiguous() for k, v in patcher.model.diffusion_model.state_dict().items()}
    unet_sd = {k: v.to(unet_dtype) for k, v in full.items()}
    te_sd = clip.cond_stage_model.state_dict()
    part = lambda prefix: {k[len(prefix):]: v.contiguous() for k, v in te_sd.items() if k.startswith(prefix)}  # noqa: E731
    clip_l, t5 = part("clip_l.transformer."), part("t5xxl.transformer.")
    vae = vae_state_dict(seed)
    files = {name: folder / f"{name}.safetensors" for name in ("checkpoint", "unet", "clip_l", "t5xxl", "vae")}
    save_file(unet_sd, str(files["unet"]))
    save_file(clip_l, str(files["clip_l"]))
    save_file(t5, str(files["t5xxl"]))
    save_file(vae, str(files["vae"]))
    allin = {**{f"model.diffusion_model.{k}": v for k, v in full.items()},  # fp32, whatever unet_dtype is
             **{f"text_encoders.clip_l.transformer.{k}": v for k, v in clip_l.items()},
             **{f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5.items()},
             **{f"vae.{k}": v for k, v in vae.items()}}
    save_file(allin, str(files["checkpoint"]))
    return files


@contextlib.contextmanager
def reduced_flux_host():
    """Within this block the host's loaders build the reduced sizes. The host hard-codes FLUX.1's sizes
    where a state dict alone can't tell them, so exactly three host functions are wrapped, each only
    for the reduced model's shapes (a full-size file passes through unchanged):

    - ``comfy.model_detection.detect_unet_config``: a FLUX config of width 64 gets 4 heads of 16 and
      axes (4, 6, 6) (the host assumes 24 heads of 128);
    - ``comfy.sd1_clip.SDClipModel.__init__``: the bundled CLIP-L and T5-XXL JSON configs are swapped
      for the reduced ones (the host builds them from those files, not from the weights);
    - ``comfy.sd.detect_te_model``: the reduced T5 (width 64) counts as T5-XXL (the host tells T5
      sizes apart by width).

    Everything else is the real path: reading the files, prefix handling, FLUX model detection, the
    FLUX CLIP type and tokenizers, dtype choices, the host's FLUX / text-encoder / VAE classes, and the
    trainer's own checks (text-encoder family via ``detect_te_model``, VAE channels, bare-FLUX files)."""
    ensure_host("cpu")
    import comfy.model_detection as md
    import comfy.sd
    import comfy.sd1_clip as sc

    orig_detect, orig_init, orig_te = md.detect_unet_config, sc.SDClipModel.__init__, comfy.sd.detect_te_model

    def detect(state_dict, key_prefix, metadata=None):
        cfg = orig_detect(state_dict, key_prefix, metadata=metadata)
        if cfg and cfg.get("image_model") == "flux" and cfg.get("hidden_size") == WIDTH:
            cfg.update(num_heads=HEADS, axes_dim=list(AXES))
        return cfg

    def init(self, *args, textmodel_json_config=None, **kwargs):
        if textmodel_json_config is None:
            textmodel_json_config = dict(CLIP_CONFIG)
        elif str(textmodel_json_config).endswith("t5_config_xxl.json"):
            textmodel_json_config = dict(T5_CONFIG)
        orig_init(self, *args, textmodel_json_config=textmodel_json_config, **kwargs)

    def detect_te(sd):
        kind = orig_te(sd)
        w = sd.get("encoder.block.0.layer.0.SelfAttention.k.weight")
        if kind == comfy.sd.TEModel.T5_BASE and w is not None and w.shape[-1] == TEXT_DIM:
            return comfy.sd.TEModel.T5_XXL
        return kind

    md.detect_unet_config, sc.SDClipModel.__init__, comfy.sd.detect_te_model = detect, init, detect_te
    try:
        yield
    finally:
        md.detect_unet_config, sc.SDClipModel.__init__, comfy.sd.detect_te_model = orig_detect, orig_init, orig_te

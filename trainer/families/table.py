"""The one table of per-family facts that ComfyUI's own API cannot express (issue 26, docs/families.md).

Everything else about a family comes from the loaded model itself, the way the host samples it
(:mod:`trainer.families.teacher`): its conditioning from ``BaseModel.extra_conds``, its
parameterisation and noise levels (shift included) from ``model_sampling``, CFG or a guidance
embedding from ``unet_config["guidance_embed"]``, its LoRA key names from
``comfy.lora.model_lora_keys_unet``, its latent layout from ``latent_format``. A family with no row
goes through that generic route unchanged; a row only overrides what it names, and says why.

This module imports no ComfyUI: rows match host classes by name.
"""
from __future__ import annotations

from dataclasses import dataclass


FLUX_FILES_HINT = ("pass the diffusion model as --unet with its text encoders and VAE: --unet flux1-dev.safetensors "
                   "--clip clip_l.safetensors --clip t5xxl_fp16.safetensors --vae ae.safetensors "
                   "(or an all-in-one FLUX checkpoint as --teacher)")


@dataclass(frozen=True)
class Row:
    """What the host can't say about one family. ``configs``: the ``comfy.supported_models`` class names
    (the model's ``model_config`` type) the row is for; ``why``: the reason the row exists."""

    family: str
    configs: tuple[str, ...]
    why: str
    #: LoRA module set and key names: "host" (every Linear of the repeated transformer blocks, under the
    #: host's generic ``lora_unet_<module path>`` keys), "kohya-unet" (docs/method.md §5 step 9, diffusers
    #: names), "flux-peft" (the released FLUX TDD LoRA's set, PEFT names; q/k/v slices of fused layers).
    lora: str = "host"
    #: "host" (``model_sampling.sigmas``, shift included) or "flux-unshifted" (``sigma_k = (k + 1) / 1000``).
    schedule: str = "host"
    #: "empty" (the encoded empty prompt) or "zeros" (zeroed text states: SDXL's unconditional branch).
    uncond: str = "empty"
    #: Text states kept per caption: "first-chunk" (one 77-token chunk) or an int (that many tokens,
    #: padded/cut), None for the encoder's whole output.
    text_tokens: int | str | None = None
    native_resolution: int | None = None
    #: The host's transformer blocks add their residuals in place (an inference memory saving) that
    #: autograd refuses; False where the family's blocks don't (the SD UNet), which keeps its step cost.
    inplace_residuals: bool = True
    #: Trainer defaults: "sd" (docs/method.md §5) or "flux" (§5.1's recipe).
    defaults: str = "sd"
    #: The host text-encoder class the recipe needs (``clip.cond_stage_model``), when only one will do.
    text_encoder: str | None = None
    #: How to give the family's missing parts (text encoders, VAE), for the error message.
    files_hint: str | None = None
    #: Padded captions (the conditioning carries a text mask) are evaluated one sample at a time, each at
    #: its own length without a mask: what the host does, which never pads a prompt.
    text_per_sample: bool = False


ROWS = (
    Row("sd15", ("SD15",), "the released SD TDD LoRAs are kohya files under diffusers names over §5's module set; "
        "one 77-token CLIP chunk per caption", lora="kohya-unet", text_tokens="first-chunk", native_resolution=512,
        inplace_residuals=False),
    Row("sd2x", ("SD20",), "as sd15 (768 px for the v-prediction checkpoints)", lora="kohya-unet",
        text_tokens="first-chunk", native_resolution=512, inplace_residuals=False),
    Row("sdxl", ("SDXL", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B"),
        "as sd15; the reference's unconditional branch zeroes the text states (§5 step 6), where the host would "
        "encode an empty prompt", lora="kohya-unet", uncond="zeros", text_tokens="first-chunk",
        native_resolution=1024, inplace_residuals=False),
    Row("flux", ("Flux",), "FLUX.1-dev's released TDD recipe (§5.1): PEFT key names over its module set, the "
        "unshifted grid where the host's model_sampling shifts by resolution, T5 cut to the tokenizer's 256",
        lora="flux-peft", schedule="flux-unshifted", text_tokens=256, native_resolution=1024, defaults="flux",
        text_encoder="FluxClipModel", files_hint=FLUX_FILES_HINT),
    Row("", ("HunyuanVideo", "HunyuanImage21"), "ComfyUI 0.33's HunyuanVideo transformer (also HunyuanImage 2.1's) "
        "averages the text states over every position, padding included, "
        "and builds the text mask of one sample only: captions padded to a batch's longest run one at a time, each "
        "at its own length", text_per_sample=True),
)

#: Families the trainer refuses by name, and why (the host's API would let them through but the
#: distillation's meaning does not hold for them).
REFUSED = {
    "FluxSchnell": "FLUX.1-schnell is already a few-step distilled model without a guidance embedding or CFG to "
                   "distil; use FLUX.1-dev or a dev fine-tune",
    "SVD_img2vid": "Stable Video Diffusion is conditioned on an input image, not a prompt; TDD Distill trains "
                   "text-to-image/video models (use the released SVD TDD LoRA)",
    "StableCascade_C": "Stable Cascade samples in two stages (prior and decoder); distil each stage is not supported",
    "StableCascade_B": "Stable Cascade samples in two stages (prior and decoder); distil each stage is not supported",
    "StableAudio": "audio models are not image/video families",
    "SDXLRefiner": "the SDXL refiner only refines an SDXL image (img2img); distil a text-to-image model: SD1.5, SD2.x, "
                   "SDXL or a transformer family",
}

#: Host parameterisations the trainer can distil (``model_sampling`` classes mixed into the sampling class).
PREDICTIONS = {"EPS": "eps", "V_PREDICTION": "v", "EDM": "edm", "CONST": "flow"}
#: Parameterisations it refuses, and why (the first of either found in the class's MRO decides).
UNSUPPORTED_PREDICTIONS = {
    "X0": "x0 prediction (an LCM-distilled or x0 model) is already a few-step model",
    "LCM": "LCM sampling (ModelSamplingDiscrete lcm) is an already distilled few-step model",
    "IMG_TO_IMG": "image-to-image sampling needs an input image, not a prompt",
    "IMG_TO_IMG_FLOW": "image-to-image sampling needs an input image, not a prompt",
    "COSMOS_RFLOW": "Cosmos' rectified-flow parameterisation is not on a noise-level table the trainer reads",
    "V_PREDICTION_DDPM": "this v-prediction variant is not on the host's variance-exploding noise table",
}


def row_for(config_name: str) -> Row | None:
    """The table row for a ``model_config`` class name, or None (the generic route). A row whose
    ``family`` is empty keeps the generic name (the config's, lower-cased)."""
    for row in ROWS:
        if config_name in row.configs:
            return row
    return None


def family_name(config_name: str) -> str:
    """The trainer's name for a family (``tdd_base_arch``): the row's, else the host config's, lower-cased."""
    row = row_for(config_name)
    return row.family if row is not None and row.family else config_name.lower()

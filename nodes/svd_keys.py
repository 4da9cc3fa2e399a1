"""SVD LoRA keys: diffusers' SVD UNet module names -> ComfyUI's video UNet weights (docs/method.md section 6).

The SVD-xt 1.1 TDD LoRA was trained on diffusers' ``UNetSpatioTemporalConditionModel``. ComfyUI 0.3.75
maps only the image-UNet part of its module names (about a third); the temporal transformer blocks,
the spatial and temporal res blocks and the positional time embedding have no key there. The full
mapping (574 Linear/Conv modules) is data: ``nodes/data/svd_lora_map.json``, generated from the two
real architectures by ``scripts/gen_svd_lora_map.py`` (shape-checked, see that script).

Naming styles added for every module ``<path>`` (e.g. ``down_blocks.0.resnets.0.temporal_res_block.conv1``):
kohya ``lora_unet_<path with _>``; PEFT/diffusers ``<path>`` and ``unet.<path>`` (``lora_A``/``lora_B``,
with or without ``.alpha``).

The reference publishes neither training code nor rank/alpha for its SVD LoRA, so its trained scale
cannot be established: strength 1.0 applies an SVD file as stored (alpha when the file has one, else
scale 1), unlike the FLUX releases.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

MAP_PATH = Path(__file__).resolve().parent / "data" / "svd_lora_map.json"
PEFT_PREFIXES = ("", "unet.")
SCALE_NOTE = ("SVD: applied as stored (strength 1.0 = the file's own alpha, or scale 1 without alpha); "
              "the TDD reference publishes no trained scale for its SVD LoRA")


@functools.lru_cache(maxsize=1)
def svd_module_map() -> dict[str, str]:
    """diffusers SVD module path -> ComfyUI ``diffusion_model`` module path (574 entries)."""
    with open(MAP_PATH, encoding="utf-8") as f:
        return {path: target for path, (target, _shape) in json.load(f)["modules"].items()}


def lora_names(path: str) -> list[str]:
    """The LoRA module names a diffusers SVD module ``path`` goes by (kohya, PEFT, PEFT with ``unet.``)."""
    return [f"lora_unet_{path.replace('.', '_')}"] + [p + path for p in PEFT_PREFIXES]


def is_spatio_temporal(base_model) -> bool:
    """True for ComfyUI's SVD-family video UNet (temporal res blocks and temporal attention)."""
    unet_config = getattr(getattr(base_model, "model_config", None), "unet_config", {}) or {}
    return bool(unet_config.get("use_temporal_resblock") and unet_config.get("use_temporal_attention"))


def add_svd_keys(base_model, key_map: dict) -> dict:
    """Extend ComfyUI's LoRA ``key_map`` for ``base_model`` (a ``comfy.model_base.BaseModel``) with the SVD
    names of every mapped module whose weight the model has; other models are returned unchanged."""
    if not is_spatio_temporal(base_model):
        return key_map
    weights = set(base_model.state_dict().keys())
    for path, target in svd_module_map().items():
        weight = f"diffusion_model.{target}.weight"
        if weight in weights:
            for name in lora_names(path):
                key_map[name] = weight
    return key_map


def format_note(lora: dict) -> str:
    """What the loader's ``info`` says about an SVD file: its key style, alpha and the scale applied."""
    style = "PEFT/diffusers keys" if any(k.endswith(".lora_A.weight") for k in lora) else "kohya keys"
    alpha = "with alpha" if any(k.endswith(".alpha") for k in lora) else "without alpha"
    return f"{style} {alpha}; {SCALE_NOTE}"


def to_host_names(lora: dict, key_map: dict, module_of) -> dict:
    """``lora`` with each module that ``key_map`` sends to a UNet weight renamed ``diffusion_model.<module>``:
    ComfyUI's own LoRA loading (which builds its own key map) knows every weight by that generic name.
    ``module_of(key)`` splits a key's module name from its suffix (``.lora_A.weight``, ``.alpha``, ...)."""
    out = {}
    for key, value in lora.items():
        module = module_of(key)
        target = key_map.get(module, "")
        if target.startswith("diffusion_model.") and target.endswith(".weight"):
            key = target[: -len(".weight")] + key[len(module):]
        out[key] = value
    return out


def low_rank_pair(lora: dict, module: str):
    """(down, up) shapes of ``module``'s LoRA factors (kohya or PEFT names), or None for other adapter kinds."""
    for down, up in (("lora_down", "lora_up"), ("lora_A", "lora_B")):
        if f"{module}.{down}.weight" in lora and f"{module}.{up}.weight" in lora:
            return tuple(lora[f"{module}.{down}.weight"].shape), tuple(lora[f"{module}.{up}.weight"].shape)
    return None


def misfits(base_model, lora: dict, key_map: dict, module_of) -> list[str]:
    """Modules of ``lora`` that have a layer in a spatio-temporal ``base_model`` but of another shape (e.g. an
    SVD-xt file on SV3D, whose added-condition embedding is narrower); ComfyUI would skip them at patch time,
    loading the file partially. [] for other models."""
    if not is_spatio_temporal(base_model):
        return []
    shapes = {k: tuple(v.shape) for k, v in base_model.state_dict().items()}
    out = []
    for module in sorted({module_of(k) for k in lora}):
        weight, pair = shapes.get(key_map.get(module, "")), low_rank_pair(lora, module)
        if weight is None or pair is None:
            continue
        (_, d_in, *kernel), (d_out, *_) = pair
        if (d_out, d_in, *kernel) != weight:
            out.append(module)
    return out

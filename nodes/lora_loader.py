"""TDD LoRA Loader -> MODEL, CLIP: the released TDD LoRAs and this pack's trainer output (docs/method.md §6).

SDXL releases and the pack's trainer use kohya keys with a stored ``.alpha``; the host's LoRA code
applies them as they are. FLUX.1-dev releases use PEFT/diffusers keys (``lora_A``/``lora_B``) with no
alpha and were trained at alpha/rank = 8/64: loaded as they are, strength 1.0 would be 8 times too
strong and break images, so this loader stores that alpha, making strength 1.0 the trained scale.
SVD-xt files name diffusers' video-UNet modules, temporal layers included; ``svd_keys`` maps them all
and applies them as stored (no trained scale is published for SVD).
A file that does not fit the model is an error naming the file and how many keys did not match.
"""
from __future__ import annotations

import logging
import os

import torch
import comfy.lora
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..tdd_core import MAX_STEPS
from . import lora_settings
from . import svd_keys
from .validation import TDDNode

log = logging.getLogger("tdd")

PEFT_TRAINED_SCALE = 8 / 64  # alpha / rank of the FLUX TDD releases (docs/method.md §6)
_MODULE_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".lora_mid.weight",
                    ".alpha", ".dora_scale", ".diff", ".diff_b", ".set_weight", ".w_norm", ".b_norm")


class LoRAMismatchError(ValueError):
    pass


def module_of(key: str) -> str:
    """The LoRA module name a state-dict key belongs to (its known suffix removed)."""
    for suffix in _MODULE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key.rsplit(".", 1)[0]


def peft_alpha_missing(lora: dict) -> list[str]:
    """Modules in PEFT/diffusers format that carry no alpha."""
    return [m for m in {module_of(k) for k in lora if k.endswith(".lora_A.weight")} if f"{m}.alpha" not in lora]


def with_trained_alpha(lora: dict, modules: list[str], scale: float = PEFT_TRAINED_SCALE) -> dict:
    """Store alpha = scale * rank for ``modules`` so the host applies the trained scale at strength 1."""
    out = dict(lora)
    for m in modules:
        rank = lora[f"{m}.lora_A.weight"].shape[0]
        out[f"{m}.alpha"] = torch.tensor(scale * rank)
    return out


def unmatched_modules(lora: dict, key_map: dict) -> list[str]:
    return sorted({module_of(k) for k in lora} - set(key_map))


def read_lora(path: str) -> tuple[dict, dict]:
    name = os.path.basename(path)
    if not name.lower().endswith((".safetensors", ".sft")):
        raise ValueError(f"TDD LoRA '{name}' is not a .safetensors file; TDD LoRAs are distributed as safetensors "
                         "(convert it, or download the .safetensors release)")
    try:
        lora, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    except Exception as e:  # safetensors raises several types for damaged headers and bodies
        raise ValueError(f"TDD LoRA '{name}' could not be read ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         "the file is corrupt or incomplete: download or copy it again") from e
    if not lora:
        raise ValueError(f"TDD LoRA '{name}' holds no tensors; download or copy it again")
    return lora, metadata or {}


def describe(name: str, metadata: dict, lora_format: str, n_modules: int) -> str:
    lines = [f"{name}: {n_modules} modules, {lora_format}"]
    tdd = {k[len("tdd_"):]: v for k, v in sorted(metadata.items()) if k.startswith("tdd_")}
    if tdd:
        lines.append("TDD metadata: " + ", ".join(f"{k}={v}" for k, v in tdd.items()))
    return "\n".join(lines)


def load_tdd_lora(model, clip, path: str, strength_model: float, strength_clip: float):
    """Patch ``model`` (and ``clip``) with the LoRA at ``path``; returns (model, clip, info)."""
    name = os.path.basename(path)
    lora, metadata = read_lora(path)
    key_map = svd_keys.add_svd_keys(model.model, comfy.lora.model_lora_keys_unet(model.model, {}))
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    missing = unmatched_modules(lora, key_map) + svd_keys.misfits(model.model, lora, key_map, module_of)
    if missing:
        total = len({module_of(k) for k in lora})
        raise LoRAMismatchError(
            f"TDD LoRA '{name}' does not fit this model: {len(missing)} of {total} LoRA modules have no matching "
            f"layer (e.g. {missing[0]}). It was made for another base architecture; pick the TDD LoRA for this "
            "checkpoint's family (SDXL, FLUX.1-dev, ...)" + ("" if clip is not None else " or connect its CLIP"))
    no_alpha = peft_alpha_missing(lora)
    if svd_keys.is_spatio_temporal(model.model):
        lora_format = svd_keys.format_note(lora)
        lora = svd_keys.to_host_names(lora, key_map, module_of)
    elif no_alpha:
        lora = with_trained_alpha(lora, no_alpha)
        lora_format = (f"PEFT/diffusers keys without alpha: applied at the trained scale 8/64 = {PEFT_TRAINED_SCALE} "
                       f"times strength (strength 1.0 is correct)")
    else:
        style = "PEFT/diffusers" if any(k.endswith(".lora_A.weight") for k in lora) else "kohya"
        lora_format = f"{style} keys with stored alpha: a trained-scale file (strength 1.0 is the trained scale)"
    info = describe(name, metadata, lora_format, len({module_of(k) for k in lora}))
    log.info("TDD LoRA %s", info)
    new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)
    return new_model, new_clip, info


class TDDLoraLoader(TDDNode):
    INPUT_HINTS = {"lora_name": "not found in models/loras: put the file there and refresh (R) the node list"}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDDLoraLoader",
            display_name="TDD LoRA Loader",
            category="loaders",
            description="Load a TDD LoRA (released SDXL/FLUX/SVD-xt files or this pack's trainer output) at its trained "
                        "scale; refuses files that do not fit the model.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the TDD LoRA was trained for."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A TDD LoRA from models/loras (.safetensors)."),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="1.0 applies the LoRA at its trained scale (FLUX releases' 8/64 included; "
                                       "SVD files as stored)."),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength on the text encoder, for LoRAs that patch it (TDD releases don't)."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The text encoder, for LoRAs that patch it; optional (e.g. FLUX)."),
                io.Int.Input("at_steps", default=0, min=0, max=MAX_STEPS, optional=True,
                             tooltip="0: output the recommended steps. Another count: output it with the eta and "
                                     "guidance the file's calibration measured for it (at 2-3 steps without one, "
                                     "guidance 1.0)."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.String.Output("info", tooltip="What was loaded and how."),
                     *lora_settings.OUTPUTS],  # appended after the original three: stored links keep their slots
        )

    @classmethod
    def execute(cls, model, lora_name, strength_model, strength_clip, clip=None, at_steps=0) -> io.NodeOutput:
        cls.check_values(strength_model=strength_model, strength_clip=strength_clip, at_steps=at_steps)
        path = folder_paths.get_full_path("loras", lora_name)
        if path is None or not os.path.isfile(path):
            raise FileNotFoundError(f"TDD LoRA '{lora_name}' was not found in models/loras; put the file there and "
                                    "refresh (R) the node list")
        new_model, new_clip, info = load_tdd_lora(model, clip, path, strength_model, strength_clip)
        settings = lora_settings.settings_for(model, path, at_steps)
        return io.NodeOutput(new_model, new_clip, f"{info}\n{settings.describe()}", *settings.values())

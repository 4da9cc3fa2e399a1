"""Recommended sampling settings that travel with a TDD LoRA: steps, eta and guidance.

A file written by this pack's trainer names them in its ``tdd_recommended_*`` metadata. The released
TDD LoRAs carry no metadata, so their settings come from the model family the LoRA is applied to
(docs/method.md §2 and §6):

* SDXL: 4 steps, eta 0.2, CFG 1.7 (the TDD reference's SDXL settings);
* FLUX.1-dev: 8 steps, eta 0, FLUX guidance 2.0 -- the reference's FLUX example is diffusers'
  FluxPipeline, a deterministic Euler sampler on FLUX's shifted schedule; on FLUX the TDD schedule
  is that schedule and the TDD step with eta 0 is that Euler step (tests/test_lora_settings.py);
* SVD-xt 1.1: 4 steps, eta 0.3, minimum guidance 1.0 (the reference's SVD demo);
* the later families the trainer distils (FLUX.2, SD3, Qwen-Image, Lumina 2, Chroma, Wan, HunyuanVideo,
  AuraFlow, ...): the pack's recipe by guidance kind (docs/families.md).

Anything else without metadata gets the generic TDD defaults (4 steps, eta 0.2, guidance 1.7).
Each value remembers where it came from, for the loader's ``info`` output.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import comfy.model_base
from comfy_api.latest import io
from safetensors import safe_open

from ..tdd_core import MAX_STEPS

#: (steps, eta, guidance, what "guidance" means, where the values come from) per model family.
FAMILY_SETTINGS = {
    "sdxl": (4, 0.2, 1.7, "CFG scale (TDD Guidance / KSampler cfg)", "TDD reference settings for SDXL"),
    "flux": (8, 0.0, 2.0, "FLUX guidance (FluxGuidance)",
             "TDD reference FLUX example: FluxPipeline's deterministic Euler = eta 0; eta 0.2 is an option to try"),
    "svd": (4, 0.3, 1.0, "minimum guidance (VideoLinearCFGGuidance min_cfg)", "TDD reference SVD demo"),
    # families without a released TDD LoRA (docs/families.md): the trainer's recipe by guidance kind.
    # Guidance-embedded transformers sample as FLUX.1 does (one pass per step, the embedding's value):
    **{name: (8, 0.0, 2.0, "guidance embedding (FluxGuidance)",
              "the pack's FLUX.1 recipe for guidance-embedded families (no released TDD LoRA)")
       for name in ("flux2", "hunyuanvideo")},
    # CFG families: TDD's 4 steps, eta 0.2, CFG 1.7 (TDD Guidance against the empty prompt)
    **{name: (4, 0.2, 1.7, "CFG scale (TDD Guidance / KSampler cfg)",
              "the pack's TDD defaults for CFG families (no released TDD LoRA)")
       for name in ("sd3", "qwenimage", "lumina2", "zimage", "chroma", "wan21_t2v", "wan22_t2v", "auraflow",
                    "hidream", "hunyuanvideo15", "ltxv")},
}
GENERIC_SETTINGS = (4, 0.2, 1.7, "CFG scale (TDD Guidance / KSampler cfg)",
                    "TDD defaults (no tdd_* metadata, model family without a released TDD LoRA)")
GUIDANCE_RANGE = (0.0, 100.0)

#: The TDD LoRA Loader's extra outputs, after MODEL, CLIP and info (wire them into TDD Scheduler's
#: steps, TDD Sampler's eta, TDD Guidance's scale or FluxGuidance's guidance).
def outputs(id_prefix: str = "") -> list:
    """The three outputs; ``id_prefix`` makes their ids unique on a node that also has such inputs
    (TDD Distill's ``steps``), their names stay steps / eta / guidance."""
    return [
        io.Int.Output(id_prefix + "steps", display_name="steps",
                      tooltip="Recommended steps (the file's metadata, else its model family); wire it into "
                              "TDD Scheduler steps or KSampler steps."),
        io.Float.Output(id_prefix + "eta", display_name="eta",
                        tooltip="Recommended eta; wire it into TDD Sampler eta. FLUX: 0 (the reference's Euler)."),
        io.Float.Output(id_prefix + "guidance", display_name="guidance",
                        tooltip="Recommended guidance: CFG scale for TDD Guidance / KSampler (SDXL), "
                                "FluxGuidance's guidance (FLUX), VideoLinearCFGGuidance min_cfg (SVD)."),
    ]


OUTPUTS = outputs()
NAMES = ("steps", "eta", "guidance")

#: Later models on FLUX.1's host class, which are not FLUX.1. Looked up by name: an older host lacks
#: the newer ones (ComfyUI 0.3.52 has Chroma but no Flux2), and a class it lacks is a family it lacks.
LATER_FLUX = tuple(cls for cls in (getattr(comfy.model_base, name, None) for name in ("Flux2", "Chroma"))
                   if isinstance(cls, type))


@dataclass(frozen=True)
class Recommended:
    """Recommended steps/eta/guidance and, per value, where it came from."""

    steps: int
    eta: float
    guidance: float
    sources: dict
    guidance_meaning: str
    calibration: str | None = None      # what the file's calibration measured, when it has one

    def values(self) -> tuple[int, float, float]:
        return self.steps, self.eta, self.guidance

    def describe(self) -> str:
        """One line per value for the loader's ``info`` output."""
        lines = [f"recommended steps={self.steps}, eta={self.eta:g}, guidance={self.guidance:g} "
                 f"({self.guidance_meaning})"]
        lines += [f"  {name}: {self.sources[name]}" for name in NAMES]
        if self.calibration:
            lines.append(f"  measured: {self.calibration}")
        return "\n".join(lines)


def model_family(model) -> str | None:
    """The family of a host ModelPatcher's model in :data:`FAMILY_SETTINGS`: "sdxl", "flux", "svd", or
    the host config's name of a later family ("flux2", "sd3", "qwenimage", "wan21_t2v", ...); else None."""
    base = model.model
    if isinstance(base, comfy.model_base.Flux) and not isinstance(base, LATER_FLUX):
        return "flux"
    if isinstance(base, comfy.model_base.SVD_img2vid):
        return "svd"
    if isinstance(base, comfy.model_base.SDXL):
        return "sdxl"
    name = type(getattr(base, "model_config", None)).__name__.lower()
    return name if name in FAMILY_SETTINGS else None


def released_format(keys) -> str | None:
    """The released TDD file format recognised from a LoRA's keys, or None."""
    keys = list(keys)
    if any(k.endswith(".lora_A.weight") for k in keys) and not any(k.endswith(".alpha") for k in keys):
        return "PEFT keys without alpha (the FLUX.1-dev release format)"
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya keys (the SDXL release format)"
    return None


def settings_for(model, path: str, at_steps: int = 0) -> Recommended:
    """The recommended settings of the LoRA file at ``path`` applied to the host ``model`` (reads
    only the file's header: its keys and metadata), at ``at_steps`` steps when given."""
    with safe_open(path, framework="pt") as f:
        metadata, fmt = f.metadata() or {}, released_format(f.keys())
    return recommended_settings(metadata, model_family(model), fmt, at_steps)


def _valid(name: str, value) -> bool:
    if name == "steps":
        return isinstance(value, int) and 1 <= value <= MAX_STEPS
    if not math.isfinite(value):
        return False
    low, high = (0.0, 1.0) if name == "eta" else GUIDANCE_RANGE
    return low <= value <= high


def metadata_value(metadata: dict, name: str):
    """The typed ``tdd_recommended_<name>`` of a file, or (None, why) when absent or unusable."""
    raw = metadata.get(f"tdd_recommended_{name}")
    if raw is None:
        return None, None
    try:
        number = float(raw)
        value = int(number) if name == "steps" and number.is_integer() else number
    except (TypeError, ValueError):
        value = None
    if value is None or not _valid(name, value):
        return None, f"tdd_recommended_{name}={raw!r} in the file is unusable"
    return value, None


#: At 2-3 steps, CFG-style guidance (SD-family students) defaults to this scale: measured on the demo
#: model, TDD Guidance 1.0 reads 78.4% at 2 steps against 70.0% at the 4-step setting 1.7; eta,
#: x0 clipping and other 2-step timesteps did not help (docs/quality.md, "At 2 steps").
FEW_STEPS, FEW_STEPS_GUIDANCE = 3, 1.0


def calibrated_at(metadata: dict, steps: int) -> tuple[float, float] | None:
    """(guidance, eta) the file's calibration chose at ``steps``, or None (no table, or not that count)."""
    try:
        best = json.loads(metadata.get("tdd_calibration") or "{}").get("best", {})[str(int(steps))]
        guidance, eta = float(best["guidance"]), float(best["eta"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return (guidance, eta) if _valid("guidance", guidance) and _valid("eta", eta) else None


def describe_calibration(raw) -> str | None:
    """One line for a file's ``tdd_calibration`` metadata (the trainer's calibration table: its
    criterion, prompts and the setting chosen per step count), or None when absent or unreadable."""
    if not raw:
        return None
    try:
        table = json.loads(raw)
        best = ", ".join(f"{k} steps: guidance {v['guidance']:g}, eta {v['eta']:g}"
                         for k, v in sorted(table["best"].items(), key=lambda kv: int(kv[0])))
        return (f"calibrated on {int(table['prompts'])} prompts ({table['criterion']} distance to the teacher's "
                f"{table['reference']}): {best}")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def recommended_settings(metadata: dict, family: str | None, file_format: str | None = None,
                         at_steps: int = 0) -> Recommended:
    """Settings from the file's ``tdd_recommended_*`` metadata, else from the model family.

    ``file_format`` names the released file format that was recognised (e.g. "PEFT keys without
    alpha"), only to say so in the sources. ``at_steps`` (0: the recommended count) asks for another
    step count: its guidance and eta come from the file's calibration at that count when it has one,
    else at 2-3 steps CFG guidance is :data:`FEW_STEPS_GUIDANCE`, else they stay the recommended ones."""
    steps, eta, guidance, meaning, origin = FAMILY_SETTINGS.get(family, GENERIC_SETTINGS)
    fallback = dict(zip(NAMES, (steps, eta, guidance)))
    if family in FAMILY_SETTINGS:
        origin = f"{family.upper()} model" + (f", {file_format}" if file_format else "") + f": {origin}"
    values, sources = {}, {}
    calibration = describe_calibration(metadata.get("tdd_calibration"))
    for name in NAMES:
        value, problem = metadata_value(metadata, name)
        if value is not None:
            values[name] = value
            sources[name] = f"the file's tdd_recommended_{name} metadata" + (", measured" if calibration else "")
        else:
            values[name] = fallback[name]
            sources[name] = origin if problem is None else f"{problem}; {origin}"
    if at_steps and at_steps != values["steps"]:
        values["steps"], sources["steps"] = at_steps, "the loader's at_steps input"
        measured = calibrated_at(metadata, at_steps)
        if measured is not None:
            values["guidance"], values["eta"] = measured
            sources["guidance"] = sources["eta"] = f"the file's calibration at {at_steps} steps"
        elif at_steps <= FEW_STEPS and meaning.startswith("CFG"):
            values["guidance"] = FEW_STEPS_GUIDANCE
            sources["guidance"] = (f"the pack's default at {FEW_STEPS} steps or fewer (TDD Guidance 1.0: at 2 steps "
                                   "larger scales cost prompt adherence, measured in docs/quality.md)")
    return Recommended(int(values["steps"]), float(values["eta"]), float(values["guidance"]), sources, meaning,
                       calibration)

"""TDD Guidance -> GUIDER: "guidance scale tuning" for distilled students (docs/method.md §3)."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from .. import tdd_core
from ._host import step_index
from .validation import TDDNode


class TDDGuider(comfy.samplers.CFGGuider):
    """CFG with the negative conditioning as the unconditional input, optionally only inside a step
    interval (one conditional pass elsewhere) and rescaled toward the conditional prediction."""

    def __init__(self, model_patcher, scale: float, start: float, end: float, rescale: float):
        super().__init__(model_patcher)
        self.set_cfg(scale)
        self.interval = (start, end)
        self.rescale = rescale

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        sample_sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        step, num_steps = step_index(sample_sigmas, timestep)
        scale = self.cfg if tdd_core.guidance_active(step, num_steps, *self.interval) else 1.0
        if self.rescale and scale != 1.0:
            model_options = {**model_options, "sampler_cfg_function": self._rescaled_cfg}
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                                self.conds.get("positive"), scale, model_options=model_options,
                                                seed=seed)

    def _rescaled_cfg(self, args):
        cond, uncond = args["cond_denoised"], args["uncond_denoised"]
        guided = tdd_core.rescale(tdd_core.cfg(cond, uncond, args["cond_scale"]), cond, self.rescale)
        return args["input"] - guided  # the host's cfg-function convention: x - denoised


class TDDGuidance(TDDNode):
    VALIDATED = ("guidance_start", "guidance_end")  # the interval between them

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDDGuidance",
            display_name="TDD Guidance",
            category="sampling/custom_sampling/guiders",
            description="Guidance scale tuning for TDD students: small-scale CFG against the empty prompt, with "
                        "an optional step interval and rescale. Neutral extras by default.",
            inputs=[
                io.Model.Input("model", tooltip="The (TDD LoRA-patched) model to guide."),
                io.Conditioning.Input("positive", tooltip="The prompt's conditioning."),
                io.Conditioning.Input("negative",
                                      tooltip="Unconditional input: encode the EMPTY prompt, as TDD was trained with."),
                io.Float.Input("scale", default=1.7, min=0.0, max=10.0, step=0.05, round=0.01,
                               tooltip="Guidance scale. 1.0 = one model pass per step; 1.3-2.0 typical for TDD; "
                                       "large values over-expose distilled models."),
                io.Float.Input("guidance_start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps where guidance starts; outside the interval only the "
                                       "conditional pass runs (fewer model evaluations)."),
                io.Float.Input("guidance_end", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps where guidance ends: 0.5 guides the first half "
                                       "(4 steps: 6 evaluations instead of 8)."),
                io.Float.Input("rescale", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Rescale the guided prediction toward the conditional prediction's spread "
                                       "against over-exposure. 0 = off."),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def cross_check(cls, guidance_start=None, guidance_end=None, **_) -> str | None:
        if guidance_start is not None and guidance_end is not None and not guidance_start <= guidance_end:
            return (f"guidance interval [{guidance_start}, {guidance_end}] is invalid: use "
                    "0 <= guidance_start <= guidance_end <= 1 (0 and 1 guide every step)")
        return None

    @classmethod
    def execute(cls, model, positive, negative, scale, guidance_start, guidance_end, rescale) -> io.NodeOutput:
        cls.check_values(scale=scale, guidance_start=guidance_start, guidance_end=guidance_end, rescale=rescale)
        guider = TDDGuider(model, scale, guidance_start, guidance_end, rescale)
        guider.set_conds(positive, negative)
        return io.NodeOutput(guider)

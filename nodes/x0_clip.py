"""TDD x0 Clip -> MODEL: clip the denoised prediction under any sampler (docs/method.md §4)."""
from __future__ import annotations

from comfy_api.latest import io

from .. import tdd_core
from ._host import step_index
from .validation import TDDNode

MODES = ["clamp", "quantile"]


def x0_clip_patch(mode: str, clip_steps: int, ratio: float, max_value: float):
    """A post-CFG function clipping x0 in the first ``clip_steps`` steps of the running schedule."""

    def patch(args):
        denoised = args["denoised"]
        sample_sigmas = args["model_options"].get("transformer_options", {}).get("sample_sigmas")
        step, _ = step_index(sample_sigmas, args["sigma"])
        if step >= clip_steps:
            return denoised
        if mode == "quantile":
            return tdd_core.dynamic_threshold(denoised, ratio, max_value)
        return denoised.clamp(-1.0, 1.0)

    return patch


class TDDX0Clip(TDDNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDDX0Clip",
            display_name="TDD x0 Clip",
            category="advanced/model",
            description="Clip the model's x0 prediction during the first steps (any sampler, stock ones included) "
                        "to curb out-of-range early predictions and over-exposure.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch."),
                io.Combo.Input("mode", options=MODES, default="clamp",
                               tooltip="clamp: x0 to [-1, 1] (the TDD reference). quantile: per-sample dynamic "
                                       "threshold s = clamp(quantile(|x0|, ratio), 1, max_value), x0 = clamp(x0, -s, s) / s."),
                io.Int.Input("clip_steps", default=1, min=0, max=tdd_core.MAX_STEPS,
                             tooltip="Clip during this many first steps of the schedule; 0 = off."),
                io.Float.Input("ratio", default=0.995, min=0.5, max=1.0, step=0.001,
                               tooltip="quantile mode: the quantile of |x0| used as threshold."),
                io.Float.Input("max_value", default=1.0, min=1.0, max=20.0, step=0.1,
                               tooltip="quantile mode: the largest threshold; 1 reduces to the plain clamp."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, mode, clip_steps, ratio, max_value) -> io.NodeOutput:
        cls.check_values(clip_steps=clip_steps, ratio=ratio, max_value=max_value)
        patched = model.clone()
        if clip_steps > 0:
            patched.set_model_sampler_post_cfg_function(x0_clip_patch(mode, clip_steps, ratio, max_value))
        return io.NodeOutput(patched)

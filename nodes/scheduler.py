"""TDD Scheduler -> SIGMAS."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..tdd_core import MAX_STEPS
from ._host import tdd_sigmas
from .validation import TDDNode


class TDDScheduler(TDDNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDDScheduler",
            display_name="TDD Scheduler",
            category="sampling/custom_sampling/schedulers",
            description="Target-Driven Distillation timestep schedule (999, 751, 499, 251 at 4 steps), as sigmas of "
                        "the model's own noise schedule.",
            inputs=[
                io.Model.Input("model", tooltip="The model whose noise schedule (model_sampling) gives the sigmas."),
                io.Int.Input("steps", default=4, min=1, max=MAX_STEPS,
                             tooltip="Sampling steps. TDD LoRAs are trained for 4-8 steps; 4 is the reference setting."),
                io.Boolean.Input("non_equidistant", default=False,
                                 tooltip="Use the non-equidistant ('special jump') schedule: short early steps, long "
                                         "late ones. Exists for 5, 6 and 7 steps."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Below 1 for image-to-image: the last steps of a longer schedule, as ComfyUI's "
                                       "own schedulers do."),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, steps, non_equidistant, denoise) -> io.NodeOutput:
        cls.check_values(steps=steps, denoise=denoise)
        if denoise <= 0.0:
            return io.NodeOutput(torch.zeros(0))
        return io.NodeOutput(tdd_sigmas(model.get_model_object("model_sampling"), steps, denoise, non_equidistant))

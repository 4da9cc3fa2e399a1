"""TDD Sampler -> SAMPLER, and the k-diffusion-style sampler function the host calls."""
from __future__ import annotations

import torch
import comfy.samplers
from comfy_api.latest import io

from .. import tdd_core
from ._host import sampling_space
from .validation import TDDNode


@torch.no_grad()
def sample_tdd(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=0.2,
               x0_clip_steps=0, batch_stable_noise=False):
    """Target-Driven Distillation sampling over a ComfyUI-wrapped model (see tdd_core.sample_tdd).

    Picks the sampling space (discrete VE, continuous VE or flow matching) from the model."""
    space = sampling_space(model.inner_model.inner_model.model_sampling)
    return tdd_core.sample_tdd(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                               noise_sampler=noise_sampler, eta=eta, x0_clip_steps=x0_clip_steps, space=space,
                               batch_stable_noise=batch_stable_noise)


class TDDSampler(TDDNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDDSampler",
            display_name="TDD Sampler",
            category="sampling/custom_sampling/samplers",
            description="Target-Driven Distillation sampler for SamplerCustom / SamplerCustomAdvanced.",
            inputs=[
                io.Float.Input("eta", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="Stochasticity (TCD's gamma): each step jumps to floor((1 - eta) * t_next) "
                                       "and re-noises. 0 = deterministic DDIM; 0.2 recommended, 0-0.3 typical."),
                io.Int.Input("x0_clip_steps", default=0, min=0, max=tdd_core.MAX_STEPS,
                             tooltip="Clamp the predicted x0 to [-1, 1] during this many first steps against "
                                     "over-exposure. 0 = off."),
                io.Boolean.Input("batch_stable_noise", default=False, optional=True,
                                 tooltip="Each batch item's step noise from its own generator seeded by (seed, "
                                         "item index): image k is the same at batch size 1..8. Off keeps the "
                                         "images of existing seeds."),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, eta, x0_clip_steps, batch_stable_noise=False) -> io.NodeOutput:
        cls.check_values(eta=eta, x0_clip_steps=x0_clip_steps)
        options = {"eta": eta, "x0_clip_steps": x0_clip_steps, "batch_stable_noise": batch_stable_noise}
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_tdd, options))

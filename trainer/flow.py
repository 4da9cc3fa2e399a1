"""Flow-matching teachers (FLUX.1): the noise levels, student move and teacher step of docs/method.md §5.1.

No ComfyUI here: the host side (loading FLUX, its text encoders and VAE, calling the transformer)
lives in the model seam, :class:`trainer.families.teacher.Teacher`. Every flow-matching family goes
through this schedule: FLUX.1 on its unshifted grid, the others on the host's (shifted) noise table,
with CFG against the empty prompt where the family has no guidance embedding.

The algebra is :class:`tdd_core.spaces.FlowMatching`, the one the TDD sampler uses:
``x = (1 - sigma) x0 + sigma n``; the host's FLUX model returns ``x0 = x - sigma v``, so moving a state
from ``sigma_t`` to ``sigma_s`` given x0 (``state(x0, eps(x, x0, sigma_t), sigma_s)``) is the Euler
step ``x + (sigma_s - sigma_t) v``. Only three things differ from the discrete (VP) teachers:

- noise levels: ``sigma_k = (k + 1) / 1000`` for integer timestep ``k`` (no resolution shift); the
  solver grid, the target set and the target draw are the same as for SD on ``k``;
- the teacher: **one** pass with the LoRA off (no CFG, no unconditional branch) and one Euler step
  ``t -> t'``;
- the conditioning: FLUX's guidance embedding, a constant or drawn per sample from a range.
"""
from __future__ import annotations

import re

import torch

from tdd_core.spaces import FlowMatching

NUM_TRAIN_TIMESTEPS = 1000

#: FLUX settings that differ from the SD defaults when left unset (the reference's FLUX script):
#: L2 loss, AdamW lr 1e-4 with weight decay 1e-2, and no empty-prompt replacement (the reference
#: parses an empty-prompt probability for FLUX but never applies it).
FLUX_DEFAULTS = {"loss": "l2", "lr": 1e-4, "weight_decay": 1e-2, "empty_prompt_prob": 0.0}
FLUX_GUIDANCE = 1.5            # the reference's constant guidance embedding during training
FLUX_METHODS = ("tdd", "tcd")  # lcm's boundary conditions are defined for the discrete VP schedule only

#: The released FLUX TDD LoRA's module set, as diffusers module paths (267 on FLUX.1-dev: 19 double
#: blocks x 6, 38 single blocks x 4, the final proj_out).
FLUX_LORA_MODULE_RE = re.compile(
    r"^(transformer_blocks\.\d+\.(attn\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2))"
    r"|single_transformer_blocks\.\d+\.(attn\.to_(q|k|v)|proj_out)"
    r"|proj_out)$")


def flow_sigmas(num: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """``sigma_k = (k + 1) / 1000`` for ``k = 0..999`` (float64): the unshifted grid of §5.1."""
    return (torch.arange(num, dtype=torch.float64) + 1.0) / num


class FlowSchedule:
    """The flow-matching counterpart of :class:`trainer.algorithm.DiscreteSchedule` (same methods).

    ``guidance_range``: ``None`` for the constant guidance already in the conditioning, or ``(lo, hi)``
    to draw FLUX's guidance per sample from ``U(lo, hi)`` (the reference's adversarial variant uses
    ``(0, 3)``), from that sample's own generator (:attr:`SampleDraws.u_guidance`).
    """

    space = FlowMatching()

    def __init__(self, guidance_range: tuple[float, float] | None = None, sigmas: torch.Tensor | None = None,
                 cfg: bool = False):
        self.sigmas = flow_sigmas() if sigmas is None else sigmas.detach().double().cpu()
        self.guidance_range = None if guidance_range is None else (float(guidance_range[0]), float(guidance_range[1]))
        self.cfg = bool(cfg)

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``sigma_t`` for integer timesteps ``t`` [B], shaped to broadcast against ``like``."""
        shape = (-1,) + (1,) * (like.ndim - 1)
        return self.sigmas[t.long().cpu()].to(like.device, like.dtype).view(shape)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = (1 - sigma_t) x0 + sigma_t n``."""
        return self.space.state(x0, noise, self.sigma(t, x0))

    def move_to(self, x, x0, t, target):
        """From the x0 prediction at ``(x, t)``, the deterministic move to ``target``:
        ``x + (sigma_s - sigma_t) v`` (the student's and the target's step)."""
        sigma_t = self.sigma(t, x)
        return self.space.state(x0, self.space.eps(x, x0, sigma_t), self.sigma(target, x))

    def condition(self, cond, draws):
        """The conditioning with this batch's guidance: per-sample draws when a range is set."""
        if self.guidance_range is None:
            return cond
        lo, hi = self.guidance_range
        return cond.with_guidance(lo + (hi - lo) * draws.u_guidance.to(cond.context.device, torch.float32))

    def teacher_step(self, teacher, x, t, t_prev, cond, uncond, w: float):
        """§5.1: the LoRA-off transformer and one Euler step ``t -> t'``: one pass with the guidance
        embedding (``uncond`` and ``w`` unused), or, for a CFG family (``cfg``), cond and uncond in one
        batched pass guided as the discrete teacher is (LCM convention ``x0_c + w (x0_c - x0_u)``; the
        Euler step of the guided x0 is the step of the guided velocity)."""
        if not self.cfg:
            return self.move_to(x, teacher(x, t, cond), t, t_prev)
        x0_c, x0_u = teacher(torch.cat([x, x]), torch.cat([t, t]), cond.cat(uncond)).chunk(2)
        return self.move_to(x, x0_c + w * (x0_c - x0_u), t, t_prev)

"""Guidance for TDD students (docs/method.md §3): small-scale CFG with the empty prompt as uncond.

Because TDD training decouples guidance, a student accepts ordinary classifier-free guidance at
scales around 1-2. Two stabilisers are offered, both neutral by default: guidance only inside an
interval of the sampling steps (outside it one conditional pass runs, saving model evaluations),
and rescaling the guided prediction toward the conditional prediction's standard deviation
(Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed").
"""
from __future__ import annotations

import torch


def cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)``; ``scale = 1`` is the conditional prediction."""
    return uncond + scale * (cond - uncond)


def rescale(guided: torch.Tensor, cond: torch.Tensor, multiplier: float) -> torch.Tensor:
    """Blend ``guided`` with itself rescaled to ``cond``'s per-sample std (0 = unchanged)."""
    if multiplier == 0.0:
        return guided
    dims = tuple(range(1, guided.ndim))
    ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return multiplier * (guided * ratio) + (1.0 - multiplier) * guided


def guidance_active(step: int, num_steps: int, start: float = 0.0, end: float = 1.0) -> bool:
    """Whether step ``step`` of ``num_steps`` lies in the guidance interval ``[start, end)``.

    Steps are placed at ``step / num_steps``; ``[0, 1)`` (the default) guides every step, and
    ``[0, 0.5)`` guides the first half (2 of 4 steps: 6 model evaluations instead of 8).
    """
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"guidance interval must satisfy 0 <= start <= end <= 1, got [{start}, {end}]")
    position = step / max(num_steps, 1)
    return start <= position < end

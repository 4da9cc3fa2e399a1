"""x0 clipping (docs/method.md §4): curb out-of-range early predictions and over-exposure."""
from __future__ import annotations

import torch


def clip_first_steps(x0: torch.Tensor, step: int, clip_steps: int, limit: float = 1.0) -> torch.Tensor:
    """Clamp ``x0`` to ``[-limit, limit]`` during the first ``clip_steps`` steps (0 = never).

    The reference's ``t_l`` is ``clip_steps - 1``: it clamps while ``step <= t_l``.
    """
    if clip_steps < 0:
        raise ValueError(f"clip_steps must be >= 0 (0 turns clipping off), got {clip_steps}")
    return x0.clamp(-limit, limit) if step < clip_steps else x0


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Quantile ("dynamic") thresholding, per sample (Imagen; the reference's general form).

    ``s = clamp(quantile(|x0|, ratio), 1, max_value)``; returns ``clamp(x0, -s, s) / s``. With
    ``max_value = 1`` this is the plain clamp to ``[-1, 1]``.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if max_value < 1.0:
        raise ValueError(f"max_value must be >= 1, got {max_value}")
    flat = x0.detach().abs().reshape(x0.shape[0], -1).float()
    s = torch.quantile(flat, ratio, dim=1).clamp(1.0, max_value).to(x0.dtype)
    s = s.view(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s

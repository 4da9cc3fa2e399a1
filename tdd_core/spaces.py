"""Sampling spaces: how a latent, its x0 prediction and its noise relate at a noise level sigma.

The TDD step (docs/method.md §2) is one idea in every parameterisation: predict x0 and eps, move
deterministically to a lower noise level ``sigma_s``, then add exactly the fresh noise that brings
the marginal back to the next scheduled level ``sigma_next``. Only the algebra differs.

Variance exploding (ComfyUI's space for eps-, v- and EDM-parameterised models)
-----------------------------------------------------------------------------
``x = x0 + sigma * eps``. A discrete VP latent ``z_t = a_t x0 + s_t eps`` is ``a_t * x`` with
``sigma_t = s_t / a_t``, so the reference's VP formulas become:

* eps:  ``eps = (x - x0) / sigma``;
* jump: ``z_s = a_s x0 + s_s eps``  <=>  ``x_s = x0 + sigma_s eps``;
* renoise ``z = sqrt(abar_n / abar_s) z_s + sqrt(1 - abar_n / abar_s) n``. Dividing by ``a_n``:
  ``x_n = x_s + sqrt(1/abar_n - 1/abar_s) n = x_s + sqrt(sigma_n^2 - sigma_s^2) n`` since
  ``1/abar = 1 + sigma^2``.

v-prediction needs nothing extra: the host turns v into x0 before the sampler sees it. SVD's
continuous EDM sigmas use the same algebra.

Flow matching (FLUX, SD3: rectified flow)
-----------------------------------------
``x = (1 - sigma) x0 + sigma eps`` with ``sigma`` in [0, 1].

* eps:  ``eps = (x - (1 - sigma) x0) / sigma``;
* jump: ``x_s = (1 - sigma_s) x0 + sigma_s eps``;
* renoise: scaling by ``r = (1 - sigma_n) / (1 - sigma_s)`` gives ``(1 - sigma_n) x0 + r sigma_s eps``,
  whose noise has standard deviation ``r sigma_s <= sigma_n``; adding
  ``sqrt(sigma_n^2 - (r sigma_s)^2) n`` restores the marginal at ``sigma_n``.

Choosing ``sigma_s``
--------------------
The reference picks ``s = floor((1 - eta) t_next)`` in integer DDPM timesteps. Models with a
discrete sigma table (SD1.5, SDXL, SD2.x) do exactly that (``sigma_table[s]``). Flow models use the
same rule in their own timestep, which is proportional to sigma: ``sigma_s = (1 - eta) sigma_next``;
continuous EDM sigmas (SVD) use that linear rule too. ``eta = 0`` always gives ``sigma_s =
sigma_next``: a deterministic DDIM step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .schedules import check_eta, timestep_floor


def _as_float(sigma) -> float:
    return float(sigma.item() if isinstance(sigma, torch.Tensor) else sigma)


def _renoise_std(var_next: float, var_kept: float) -> float:
    return math.sqrt(max(var_next - var_kept, 0.0))


@dataclass(frozen=True, eq=False)
class VarianceExploding:
    """``x = x0 + sigma * eps``; optionally with the teacher's discrete sigma table.

    ``sigma_table[t]`` is the noise level of integer DDPM timestep ``t`` (ComfyUI's
    ``model_sampling.sigmas``). Without a table, ``sigma_s = (1 - eta) * sigma_next``.
    """

    sigma_table: torch.Tensor | None = None

    def eps(self, x: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
        return (x - x0) / sigma

    def __post_init__(self):
        if self.sigma_table is not None:  # computed once, not at every step
            object.__setattr__(self, "_log_table", self.sigma_table.double().log())

    def timestep(self, sigma) -> int:
        """Nearest discrete timestep of ``sigma`` (in log sigma), as ComfyUI's ``timestep()``."""
        return int((self._log_table - math.log(_as_float(sigma))).abs().argmin())

    def target_sigma(self, sigma_next, eta: float) -> float:
        sigma_next = _as_float(sigma_next)
        if self.sigma_table is None:
            return (1.0 - check_eta(eta)) * sigma_next
        t_next = self.timestep(sigma_next)
        s = timestep_floor(t_next, eta)
        return sigma_next if s >= t_next else _as_float(self.sigma_table[s])

    def state(self, x0, eps, sigma):
        """The latent at noise level ``sigma`` (a float or a broadcastable tensor): ``x0 + sigma eps``."""
        return x0 + sigma * eps

    def jump(self, x0, eps, sigma_s: float, sigma_next: float, noise) -> torch.Tensor:
        x = self.state(x0, eps, sigma_s)
        std = _renoise_std(sigma_next ** 2, sigma_s ** 2)
        return x + std * noise if std > 0 else x


@dataclass(frozen=True, eq=False)
class FlowMatching:
    """``x = (1 - sigma) * x0 + sigma * eps`` (rectified flow: FLUX, SD3); ``sigma_s = (1 - eta) sigma_next``."""

    def eps(self, x: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
        return (x - (1.0 - sigma) * x0) / sigma

    def target_sigma(self, sigma_next, eta: float) -> float:
        return (1.0 - check_eta(eta)) * _as_float(sigma_next)

    def state(self, x0, eps, sigma):
        """The latent at noise level ``sigma`` (a float or a broadcastable tensor): ``(1 - sigma) x0 + sigma eps``.

        ``state(x0, eps(x, x0, sigma_t), sigma_s)`` is the deterministic move from ``sigma_t`` to ``sigma_s``;
        with the velocity ``v = (x - x0) / sigma_t`` it equals the Euler step ``x + (sigma_s - sigma_t) v``
        (the trainer's student move and FLUX teacher step, docs/method.md §5.1)."""
        return (1.0 - sigma) * x0 + sigma * eps

    def jump(self, x0, eps, sigma_s: float, sigma_next: float, noise) -> torch.Tensor:
        x_s = self.state(x0, eps, sigma_s)
        r = (1.0 - sigma_next) / (1.0 - sigma_s)
        std = _renoise_std(sigma_next ** 2, (r * sigma_s) ** 2)
        return r * x_s + std * noise if std > 0 else r * x_s


Space = VarianceExploding | FlowMatching

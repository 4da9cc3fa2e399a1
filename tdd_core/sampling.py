"""The TDD sampler, in k-diffusion's shape: a pure function over a denoiser callable.

``model(x, sigma * s_in, **extra_args)`` returns the denoised prediction x0 (as ComfyUI's and
k-diffusion's wrapped models do); ``sigmas`` is the descending noise-level schedule ending in 0.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import trange

from .clipping import clip_first_steps
from .schedules import check_eta
from .spaces import Space, VarianceExploding

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_noise_sampler(x: torch.Tensor, seed: int | None = None) -> NoiseSampler:
    """Standard normal noise shaped like ``x`` from a generator seeded with ``seed`` (if given)."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(seed)

    def sample(sigma, sigma_next):
        return torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)

    return sample


def tdd_step(space: Space, x: torch.Tensor, x0: torch.Tensor, sigma, sigma_next, eta: float,
             noise: torch.Tensor) -> torch.Tensor:
    """One stochastic TDD step from ``sigma`` to ``sigma_next`` (spec section 2, steps 3-5)."""
    eps = space.eps(x, x0, sigma)
    sigma_s = space.target_sigma(sigma_next, eta)
    return space.jump(x0, eps, sigma_s, float(sigma_next), noise)


@torch.no_grad()
def sample_tdd(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
               eta=0.2, x0_clip_steps=0, space: Space | None = None):
    """Target-Driven Distillation sampling (Wang et al. 2024, arXiv 2409.01347).

    At each step the x0 prediction (optionally clamped to [-1, 1] during the first
    ``x0_clip_steps`` steps) and its implied noise jump deterministically to the lower level
    ``s = floor((1 - eta) t_next)``, then fresh noise from ``noise_sampler`` brings the state back
    to ``t_next``; the last step returns x0. ``eta = 0`` is DDIM; ``eta = 1`` jumps to timestep 0 as LCM does.
    ``space`` chooses the parameterisation (:mod:`tdd_core.spaces`), variance exploding by default.
    """
    check_eta(eta)
    extra_args = {} if extra_args is None else extra_args
    space = VarianceExploding() if space is None else space
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = clip_first_steps(model(x, sigmas[i] * s_in, **extra_args), i, x0_clip_steps)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = tdd_step(space, x, denoised, sigmas[i], sigmas[i + 1], eta, noise_sampler(sigmas[i], sigmas[i + 1]))
    return x

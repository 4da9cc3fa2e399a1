"""The TDD sampler, in k-diffusion's shape: a pure function over a denoiser callable.

``model(x, sigma * s_in, **extra_args)`` returns the denoised prediction x0 (as ComfyUI's and
k-diffusion's wrapped models do); ``sigmas`` is the descending noise-level schedule ending in 0.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
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


def item_seed(seed: int, index: int) -> int:
    """The generator seed of batch item ``index`` in a run seeded with ``seed``.

    The pair is mixed by numpy's SeedSequence, so different pairs give unrelated streams (a plain
    ``seed + index`` would make item 1 of seed 0 the same as item 0 of seed 1)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0])


def batch_stable_noise_sampler(x: torch.Tensor, seed: int, first_index: int = 0) -> NoiseSampler:
    """Per-item noise: item k's noise comes from its own generator seeded by ``(seed, first_index + k)``.

    Item k then gets the same noise at every batch size that contains it, unlike one generator
    for the whole batch, whose draws for item k depend on how many items came before it;
    ``first_index`` numbers the items of a chunk of a larger batch."""
    generators = [torch.Generator(device=x.device).manual_seed(item_seed(seed, first_index + k))
                  for k in range(x.shape[0])]

    def sample(sigma, sigma_next):
        return torch.stack([torch.randn(x.shape[1:], dtype=x.dtype, layout=x.layout, device=x.device, generator=g)
                            for g in generators])

    return sample


def tdd_step(space: Space, x: torch.Tensor, x0: torch.Tensor, sigma, sigma_next, eta: float,
             noise: torch.Tensor) -> torch.Tensor:
    """One stochastic TDD step from ``sigma`` to ``sigma_next`` (docs/method.md §2, steps 3-5)."""
    eps = space.eps(x, x0, sigma)
    sigma_s = space.target_sigma(sigma_next, eta)
    return space.jump(x0, eps, sigma_s, float(sigma_next), noise)


@torch.no_grad()
def sample_tdd(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
               eta=0.2, x0_clip_steps=0, space: Space | None = None, batch_stable_noise=False):
    """Target-Driven Distillation sampling (Wang et al. 2024, arXiv 2409.01347).

    At each step the x0 prediction (optionally clamped to [-1, 1] during the first
    ``x0_clip_steps`` steps) and its implied noise jump deterministically to the lower level
    ``s = floor((1 - eta) t_next)``, then fresh noise from ``noise_sampler`` brings the state back
    to ``t_next``; the last step returns x0. ``eta = 0`` is DDIM; ``eta = 1`` jumps to timestep 0 as LCM does.
    ``space`` chooses the parameterisation (:mod:`tdd_core.spaces`), variance exploding by default.
    ``batch_stable_noise`` draws each batch item's step noise from its own generator seeded by
    (seed, item index) (:func:`batch_stable_noise_sampler`), so an item's image does not depend on
    the batch size; off by default, which keeps the images of existing seeds.
    """
    check_eta(eta)
    extra_args = {} if extra_args is None else extra_args
    space = VarianceExploding() if space is None else space
    if noise_sampler is None:
        seed = extra_args.get("seed")
        stable = batch_stable_noise and seed is not None
        noise_sampler = batch_stable_noise_sampler(x, seed) if stable else default_noise_sampler(x, seed=seed)
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

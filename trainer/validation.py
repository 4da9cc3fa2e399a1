"""Validation grids: the student sampled with tdd_core's TDD sampler at 4 and 8 steps."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from tdd_core import default_noise_sampler, sample_tdd, tdd_timesteps

from .fileio import atomic_path

log = logging.getLogger(__name__)


@torch.no_grad()
def sample_images(teacher, cond, shape, steps: int, seed: int, eta: float = 0.2) -> torch.Tensor:
    """Images [B, H, W, 3] from the (LoRA-on) model with ``steps`` TDD steps, guidance 1, in the
    teacher's own sampling space (variance exploding for SD, flow matching for FLUX)."""
    sigma_table = teacher.sigmas
    sigmas = torch.cat([sigma_table[tdd_timesteps(steps)], sigma_table.new_zeros(1)]).to(teacher.device)
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(shape, generator=gen).to(teacher.device)
    x = teacher.start_latent(noise, sigmas[0])  # ComfyUI's full-denoise noise scaling
    x0 = sample_tdd(teacher.denoiser(cond), x, sigmas, eta=eta, disable=True,
                    noise_sampler=default_noise_sampler(x, seed=int(seed) + 1), space=teacher.space())
    return teacher.decode(x0)


def write_grid(teacher, conds: list, latent_shape, path, seed: int = 0, steps=(4, 8), eta: float = 0.2,
               write: bool = True) -> Path:
    """PNG grid: one row per step count, one column per prompt (same seed per column). ``write`` False:
    sample only (a sharded base's other processes, whose model calls rank 0's need)."""
    from PIL import Image

    rows = []
    for k in steps:
        row = [sample_images(teacher, c, (1, *latent_shape), k, seed + j, eta)[0] for j, c in enumerate(conds)]
        rows.append(torch.cat(row, dim=1))
    grid = torch.cat(rows, dim=0)
    path = Path(path)
    if not write:
        return path
    img = Image.fromarray((grid.numpy() * 255).round().astype(np.uint8))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    log.info("validation grid (%s steps) -> %s", "/".join(map(str, steps)), path)
    return path

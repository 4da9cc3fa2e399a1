"""Tiny shared helpers between ComfyUI's model_sampling objects and tdd_core."""
from __future__ import annotations

import torch
import comfy.model_sampling

from ..tdd_core import FlowMatching, Space, VarianceExploding, schedule_timesteps, table_index


def sampling_space(model_sampling) -> Space:
    """The tdd_core space of a host model: flow matching, or variance exploding with the discrete
    sigma table of DDPM-trained models (eps, v) so TDD targets land on integer timesteps."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return FlowMatching()
    discrete = (isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete)
                and not isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscreteEDM))
    return VarianceExploding(model_sampling.sigmas.detach().cpu().double()) if discrete else VarianceExploding()


def sigma_at_timestep(model_sampling, timestep: int, num_train_timesteps: int = 1000) -> float:
    """The model's own noise level for a TDD timestep (0..999), read from its ascending sigma table.

    DDPM models have one entry per timestep; flow and EDM tables span the same range at their own
    resolution, so the timestep is placed proportionally."""
    table = model_sampling.sigmas
    return float(table[table_index(timestep, len(table), num_train_timesteps)])


def tdd_sigmas(model_sampling, steps: int, denoise: float = 1.0, non_equidistant: bool = False) -> torch.Tensor:
    """The TDD schedule as ComfyUI SIGMAS (descending, ending in 0)."""
    timesteps = schedule_timesteps(steps, denoise, non_equidistant)
    return torch.tensor([sigma_at_timestep(model_sampling, t) for t in timesteps] + [0.0], dtype=torch.float32)


def step_index(sample_sigmas: torch.Tensor | None, sigma: torch.Tensor) -> tuple[int, int]:
    """(index of the current step, number of steps) from the schedule the host is sampling."""
    if sample_sigmas is None or len(sample_sigmas) < 2:
        return 0, 1
    current = float(sigma.reshape(-1)[0])
    distances = (sample_sigmas[:-1].detach().float().cpu() - current).abs()
    return int(distances.argmin()), len(sample_sigmas) - 1

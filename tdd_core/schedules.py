"""TDD timestep schedules: the solver grid, K-step inference schedules and the training target set.

Everything here is in the discrete DDPM convention of the teacher: integer timesteps in
``[0, num_train_timesteps)``, 999 being pure noise. Mapping timesteps to noise levels is the job of
the host (ComfyUI's ``model_sampling``) or of :mod:`tdd_core.spaces`; no betas live here.
"""
from __future__ import annotations

import math

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
NUM_GRID_POINTS = 250
MAX_STEPS = 50

#: Non-equidistant ("special jump") schedules: short early steps, long late ones (docs/method.md §1).
NON_EQUIDISTANT_SCHEDULES: dict[int, tuple[int, ...]] = {
    5: (999, 875, 751, 499, 251),
    6: (999, 875, 751, 627, 499, 251),
    7: (999, 875, 751, 627, 499, 375, 251),
}


def table_index(timestep: int, table_len: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> int:
    """The entry of a host's ascending noise-level table of ``table_len`` levels for a timestep: the
    timestep itself in a 1000-level DDPM table, placed proportionally in a finer one (FLUX-type models
    keep 10000 levels) or a coarser one. TDD Scheduler (sampling) and the trainer read noise levels
    through this one mapping, so a LoRA is sampled at the noise levels it was trained at."""
    return round(int(timestep) * (int(table_len) - 1) / (num_train_timesteps - 1))


def solver_grid(num_points: int = NUM_GRID_POINTS, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """The ascending solver grid ``{k*i - 1 : i = 1..N}`` with ``k = T / N`` (3, 7, ..., 999 by default)."""
    if num_points < 1 or num_train_timesteps % num_points:
        raise ValueError(
            f"num_points={num_points} must be a positive divisor of num_train_timesteps={num_train_timesteps}")
    k = num_train_timesteps // num_points
    return np.arange(1, num_points + 1, dtype=np.int64) * k - 1


def _check_steps(steps: int, max_steps: int = MAX_STEPS) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= max_steps:
        raise ValueError(f"steps must be an integer from 1 to {max_steps}, got {steps!r}; "
                         "TDD LoRAs are trained for 4-8 steps")


def tdd_timesteps(steps: int, num_points: int = NUM_GRID_POINTS,
                  num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The equidistant K-step TDD schedule, descending (K=4: 999, 751, 499, 251).

    The reversed solver grid indexed by ``floor(linspace(0, N, K, endpoint=False))``, as the
    reference TDD scheduler does.
    """
    _check_steps(steps, min(MAX_STEPS, num_points))
    grid = solver_grid(num_points, num_train_timesteps)[::-1]
    idx = np.floor(np.linspace(0, num_points, steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in grid[idx]]


def schedule_timesteps(steps: int, denoise: float = 1.0, non_equidistant: bool = False) -> list[int]:
    """Timesteps a sampler visits for ``steps`` steps at ``denoise`` strength.

    ``denoise < 1`` (img2img) builds the schedule for ``int(steps / denoise)`` steps and keeps its
    last ``steps`` entries, as ComfyUI's own schedulers do. ``non_equidistant`` selects the special
    jump schedules, which exist for 5, 6 and 7 total steps only.
    """
    _check_steps(steps)
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise!r}")
    total = steps if denoise >= 1.0 else int(steps / denoise)
    if non_equidistant:
        if total not in NON_EQUIDISTANT_SCHEDULES:
            raise ValueError(
                f"the non-equidistant TDD schedule exists for 5, 6 or 7 total steps, but {steps} steps "
                f"at denoise {denoise} needs {total}; turn non_equidistant off or pick 5-7 steps")
        full = list(NON_EQUIDISTANT_SCHEDULES[total])
    else:
        full = tdd_timesteps(min(total, NUM_GRID_POINTS))
    return full[-steps:]


def target_set(kmin: int = 4, kmax: int = 8) -> list[int]:
    """Training targets for students that sample with ``kmin..kmax`` steps.

    The union of those K-step schedules, sorted, with 0 prepended and the largest value (999)
    dropped: 22 values for [4, 8].
    """
    _check_steps(kmin)
    _check_steps(kmax)
    if kmin > kmax:
        raise ValueError(f"kmin ({kmin}) must not exceed kmax ({kmax})")
    union = sorted({t for k in range(kmin, kmax + 1) for t in tdd_timesteps(k)})
    return [0] + union[:-1]


def check_eta(eta: float) -> float:
    """Validate the TDD stochasticity ``eta`` (TCD's gamma)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta!r}; the reference range is 0-0.3 (0.2 recommended)")
    return eta


def timestep_floor(t: float, eta: float) -> int:
    """The stochastic target timestep ``floor((1 - eta) * t)`` of the TDD step."""
    return int(math.floor((1.0 - check_eta(eta)) * t))

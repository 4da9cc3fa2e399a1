"""Framework-agnostic Target-Driven Distillation maths (torch and numpy only; never ComfyUI)."""
from .clipping import clip_first_steps, dynamic_threshold
from .guidance import cfg, guidance_active, rescale
from .sampling import batch_stable_noise_sampler, default_noise_sampler, item_seed, sample_tdd, tdd_step
from .schedules import (MAX_STEPS, check_eta, NON_EQUIDISTANT_SCHEDULES, NUM_TRAIN_TIMESTEPS, schedule_timesteps, solver_grid,
                        table_index, target_set, tdd_timesteps, timestep_floor)
from .spaces import FlowMatching, Space, VarianceExploding

__all__ = [
    "MAX_STEPS", "NON_EQUIDISTANT_SCHEDULES", "NUM_TRAIN_TIMESTEPS", "FlowMatching", "Space", "VarianceExploding",
    "batch_stable_noise_sampler", "cfg", "check_eta", "clip_first_steps", "default_noise_sampler", "dynamic_threshold",
    "guidance_active", "item_seed", "rescale",
    "sample_tdd", "schedule_timesteps", "solver_grid", "table_index", "target_set", "tdd_step", "tdd_timesteps", "timestep_floor",
]

"""Make `tdd` a sampler name and a scheduler name of the stock KSampler and KSamplerAdvanced."""
from __future__ import annotations

import logging

import comfy.samplers
from comfy.k_diffusion import sampling as k_diffusion_sampling

from ._host import tdd_sigmas
from .sampler import sample_tdd

log = logging.getLogger("tdd")
NAME = "tdd"


def tdd_scheduler(model_sampling, steps: int):
    """The equidistant TDD schedule for the host's scheduler registry."""
    return tdd_sigmas(model_sampling, steps)


def register_host_names() -> None:
    """Idempotently add ``tdd`` to the host's sampler and scheduler lists.

    The host builds samplers by name as ``k_diffusion_sampling.sample_<name>`` and schedulers from
    ``SCHEDULER_HANDLERS``; KSampler's input lists are the same list objects, so appending is enough.
    """
    k_diffusion_sampling.sample_tdd = sample_tdd
    for names in (comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES):
        if NAME not in names:
            names.append(NAME)
    comfy.samplers.SCHEDULER_HANDLERS[NAME] = comfy.samplers.SchedulerHandler(tdd_scheduler)
    if NAME not in comfy.samplers.SCHEDULER_NAMES:
        comfy.samplers.SCHEDULER_NAMES.append(NAME)
    log.debug("registered sampler and scheduler '%s'", NAME)

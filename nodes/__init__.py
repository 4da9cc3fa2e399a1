"""ComfyUI nodes of the TDD pack: thin V3 nodes over tdd_core, one file per feature."""
from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

from .demo_images import ensure_demo_images
from .distill import TDDDistill
from . import prompt_guard
from .demo_loader import TDDDemoCheckpointLoader, register_demo_lora_folder, register_demo_weights_folder
from .guidance import TDDGuidance
from .lora_loader import TDDLoraLoader
from .registration import register_host_names
from .sampler import TDDSampler
from .scheduler import TDDScheduler
from .x0_clip import TDDX0Clip

NODES: list[type[io.ComfyNode]] = [TDDScheduler, TDDSampler, TDDGuidance, TDDX0Clip, TDDLoraLoader,
                                   TDDDemoCheckpointLoader, TDDDistill]


class TDDExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> TDDExtension:
    register_host_names()
    prompt_guard.register()
    register_demo_lora_folder()
    register_demo_weights_folder()
    try:
        ensure_demo_images()
    except OSError as e:  # a read-only input directory: the demo distillation workflow lacks its images
        logging.getLogger("tdd").warning("TDD: could not write the demo training images: %s", e)
    return TDDExtension()

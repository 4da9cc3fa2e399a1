"""TDD for ComfyUI: Target-Driven Distillation sampling nodes (loaded by ComfyUI from custom_nodes/)."""
from .nodes import comfy_entrypoint

# web/: the frontend side (TDD Distill refreshes the LoRA lists when it has written a file)
WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]

"""TDD for ComfyUI: Target-Driven Distillation sampling nodes (loaded by ComfyUI from custom_nodes/)."""
from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]

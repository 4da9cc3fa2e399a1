"""TDD Demo Checkpoint Loader -> MODEL, CLIP, VAE: the embedded tiny text-to-image model."""
from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io

from . import demo_model

log = logging.getLogger("tdd")


def register_demo_lora_folder() -> None:
    """List the shipped demo TDD LoRA (demo/loras) among the LoRAs of every loader."""
    if os.path.isdir(demo_model.LORA_DIR):
        folder_paths.add_model_folder_path("loras", demo_model.LORA_DIR)


class TDDDemoCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDDDemoCheckpointLoader",
            display_name="TDD Demo Checkpoint Loader",
            category="loaders",
            description="The pack's embedded tiny text-to-image model (64x64 images of coloured, patterned shapes; "
                        "see docs/demo_model.md). Its TDD LoRA is listed as demo_tdd_lora.safetensors.",
            inputs=[
                io.String.Input("weights_dir", default="",
                                tooltip="Folder with demo_unet/demo_clip/demo_vae.safetensors; empty = the weights "
                                        "shipped with the pack."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, weights_dir) -> io.NodeOutput:
        folder = weights_dir.strip() or demo_model.WEIGHTS_DIR
        log.info("loading the TDD demo model from %s", folder)
        return io.NodeOutput(*demo_model.build(folder))

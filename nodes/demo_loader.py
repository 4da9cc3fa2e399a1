"""TDD Demo Checkpoint Loader -> MODEL, CLIP, VAE: the embedded tiny text-to-image model."""
from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io

from . import demo_model
from .validation import TDDNode

log = logging.getLogger("tdd")


def register_demo_lora_folder() -> None:
    """List the shipped demo TDD LoRA (demo/loras) among the LoRAs of every loader."""
    if os.path.isdir(demo_model.LORA_DIR):
        folder_paths.add_model_folder_path("loras", demo_model.LORA_DIR)


#: The folders the loader may read, by the name a user picks: never a free-form server path.
SHIPPED = "shipped (demo/weights)"
USER_FOLDER = "models/tdd_demo"
FOLDER_NAME = "tdd_demo"  # folder_paths name: models/tdd_demo, plus extra_model_paths.yaml entries


def register_demo_weights_folder() -> None:
    """Register models/tdd_demo (ComfyUI's convention for model files) for user-built demo weights."""
    folder_paths.add_model_folder_path(FOLDER_NAME, os.path.join(folder_paths.models_dir, FOLDER_NAME))


def user_weights_dir() -> str:
    """The registered tdd_demo folder that holds the demo weights (the first one when none does)."""
    folders = folder_paths.get_folder_paths(FOLDER_NAME)
    complete = [d for d in folders if all(os.path.isfile(os.path.join(d, f)) for f in demo_model.FILES.values())]
    if complete:
        return complete[0]
    missing = [f for f in demo_model.FILES.values() if not any(os.path.isfile(os.path.join(d, f)) for d in folders)]
    raise FileNotFoundError(
        f"{USER_FOLDER} does not hold the demo weights ({', '.join(missing or demo_model.FILES.values())} missing): "
        f"put demo_unet/demo_clip/demo_vae.safetensors (e.g. from `make demo-model`) there, or pick '{SHIPPED}'")


def weights_folder(choice: str) -> str:
    """The folder of a ``weights`` choice."""
    return demo_model.WEIGHTS_DIR if choice == SHIPPED else user_weights_dir()


class TDDDemoCheckpointLoader(TDDNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TDDDemoCheckpointLoader",
            display_name="TDD Demo Checkpoint Loader",
            category="loaders",
            description="The pack's embedded tiny text-to-image model (64x64 images of coloured, patterned shapes; "
                        "see docs/demo_model.md). Its TDD LoRA is listed as demo_tdd_lora.safetensors.",
            inputs=[
                io.Combo.Input("weights", options=[SHIPPED, USER_FOLDER], default=SHIPPED,
                               tooltip="Where demo_unet/demo_clip/demo_vae.safetensors come from: the weights "
                                       "shipped with the pack, or your own in ComfyUI's models/tdd_demo folder."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, weights) -> io.NodeOutput:
        folder = weights_folder(weights)
        log.info("loading the TDD demo model from %s", folder)
        return io.NodeOutput(*demo_model.build(folder))

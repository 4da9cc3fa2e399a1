"""Test-only ComfyUI custom-node pack for the TDD pack's tests (never shipped to users).

Installed by symlink into a test base directory's ``custom_nodes/``.  Provides
``TDDTestTinyModel``: MODEL, CLIP and VAE of a tiny random-weight SD1.5-style model;
``TDDTestFamilyModel``: the same for a tiny model of another family (families.py).
"""
from comfy_api.latest import ComfyExtension, io

from .families import FAMILIES, UNSUPPORTED
from .families import build as build_family
from .families import pause_until_cancelled
from .tiny import build_tiny_sd15


class TDDTestTinyModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TDDTestTinyModel",
            display_name="TDD test: tiny SD1.5 model",
            category="_for_testing/tdd",
            description="Tiny random-weight SD1.5-style MODEL/CLIP/VAE for tests (64x64 image = 8x8 latent).",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**31 - 1)],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, seed: int) -> io.NodeOutput:
        model, clip, vae = build_tiny_sd15(seed)
        return io.NodeOutput(model, clip, vae)


class TDDTestFamilyModel(io.ComfyNode):
    """MODEL, CLIP, VAE of a tiny random-weight model of one family ComfyUI runs (tdd_test_nodes/families.py):
    the diffusion model from the host's own classes; the CLIP is the test-only text encoder that gives
    the family's conditioning shapes (these families' real text encoders can't be built small here)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TDDTestFamilyModel",
            display_name="TDD test: tiny model of a family",
            category="_for_testing/tdd",
            description="Tiny random-weight MODEL/CLIP/VAE of SD3, FLUX.2, Qwen-Image, Lumina 2, Z-Image, Chroma, Wan 2.1, "
                        "HunyuanVideo or AuraFlow (or Wan 2.1 image-to-video, which the trainer refuses), from "
                        "ComfyUI's own classes (test-only text encoder).",
            inputs=[io.Combo.Input("family", options=sorted(FAMILIES) + sorted(UNSUPPORTED)),
                    io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                    io.Int.Input("pause_at_call", default=0, min=0, max=10**6, optional=True,
                                 tooltip="Test-only: the diffusion model's N-th forward call waits until the "
                                         "prompt is cancelled (ComfyUI's /interrupt), so a test's Cancel lands "
                                         "at a known point of a run; 0 = never.")],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, family: str, seed: int, pause_at_call: int = 0) -> io.NodeOutput:
        model, clip, vae = build_family(family, seed)
        if pause_at_call:
            pause_until_cancelled(model, pause_at_call)
        return io.NodeOutput(model, clip, vae)


class TDDTestExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TDDTestTinyModel, TDDTestFamilyModel]


async def comfy_entrypoint() -> TDDTestExtension:
    return TDDTestExtension()

"""Test-only ComfyUI custom-node pack for the TDD pack's tests (never shipped to users).

Installed by symlink into a test base directory's ``custom_nodes/``.  Provides
``TDDTestTinyModel``: MODEL, CLIP and VAE of a tiny random-weight SD1.5-style model.
"""
from comfy_api.latest import ComfyExtension, io

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


class TDDTestExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TDDTestTinyModel]


async def comfy_entrypoint() -> TDDTestExtension:
    return TDDTestExtension()

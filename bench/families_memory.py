"""The memory column of docs/families.md: trainer/memory.py's estimate for each family's real weights
at batch 1 (bf16 base, rank 64), without and with gradient checkpointing.

Sizes are the published ones (parameters, transformer width and blocks); tokens are the latent
positions after patching at the family's usual resolution (video: its usual clip) plus its text states.
Run: ``python bench/families_memory.py`` (prints the markdown table; no model is loaded).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trainer.memory import GIB, ModelSize, estimate  # noqa: E402

#: family -> (what, params, width, blocks, tokens, at)
SIZES = {
    "SD1.5": (0.86e9, 640, 16, 4096 + 77, "512 px (UNet: width/blocks of its attention levels)"),
    "SDXL": (2.57e9, 1280, 70, 4096 + 77, "1024 px (UNet: its 64x64 and 32x32 attention levels)"),
    "FLUX.1-dev": (11.9e9, 3072, 57, 4096 + 512, "1024 px"),
    "FLUX.2-dev": (32.2e9, 6144, 56, 4096 + 512, "1024 px"),
    "SD3.5 Large": (8.1e9, 2432, 38, 4096 + 333, "1024 px"),
    "Qwen-Image": (20.4e9, 3072, 60, 4096 + 256, "1024 px"),
    "Z-Image": (6.2e9, 3840, 30, 4096 + 256, "1024 px"),
    "Lumina 2": (2.6e9, 2304, 26, 4096 + 256, "1024 px"),
    "Chroma": (8.9e9, 3072, 57, 4096 + 512, "1024 px"),
    "AuraFlow": (6.8e9, 3072, 36, 4096 + 256, "1024 px"),
    "HiDream-I1": (17.1e9, 2560, 48, 4096 + 384, "1024 px"),
    "Wan 2.1 1.3B": (1.4e9, 1536, 30, 32760 + 512, "480p, 81 frames"),
    "Wan 2.1 14B": (14.3e9, 5120, 40, 32760 + 512, "480p, 81 frames"),
    "HunyuanVideo": (12.8e9, 3072, 60, 29700 + 256, "720p, 129 frames"),
    "HunyuanVideo 1.5": (8.3e9, 2048, 54, 24645 + 256, "480p, 121 frames"),
    "LTX-Video 2B": (1.9e9, 2048, 28, 24960 + 128, "768x512, 121 frames"),
}


def rows():
    for name, (params, width, blocks, tokens, at) in SIZES.items():
        size = ModelSize(params=int(params), width=width, blocks=blocks, tokens=tokens)
        plain = estimate(size, base_dtype="bf16")
        ckpt = estimate(size, base_dtype="bf16", checkpointing=True)
        yield name, params, at, plain.total / GIB, ckpt.total / GIB


def main() -> None:
    print("| family | weights (bf16) | at | batch 1, no checkpointing | with gradient checkpointing |")
    print("|---|---|---|---|---|")
    for name, params, at, plain, ckpt in rows():
        print(f"| {name} | {params / 1e9:.1f}B = {2 * params / GIB:.0f} GiB | {at} | {plain:.0f} GiB | {ckpt:.0f} GiB |")


if __name__ == "__main__":
    main()

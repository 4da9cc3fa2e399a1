"""The trainer's LoRA file format: kohya keys plus ``tdd_*`` safetensors header metadata.

No ComfyUI import here: the pack's loader node reuses :func:`read_tdd_metadata`.

Keys: ``lora_unet_<diffusers module path, dots as underscores>.lora_down.weight`` /
``.lora_up.weight`` / ``.alpha`` (alpha stored, so strength 1.0 applies the trained scale).
"""
from __future__ import annotations

import json
import struct

import torch

#: Metadata keys the pack's TDD LoRA loader reads, with their value types.
TDD_METADATA_TYPES = {
    "tdd_base_arch": str,
    "tdd_method": str,
    "tdd_kmin": int,
    "tdd_kmax": int,
    "tdd_recommended_steps": int,
    "tdd_recommended_eta": float,
    "tdd_recommended_guidance": float,
    "tdd_training_steps": int,
    "tdd_skipped_files": int,
}
TDD_FORMAT_VERSION = "1"

#: Inference settings recommended per training method (docs/method.md §2; LCM samples with eta=1, w=1).
RECOMMENDED = {"tdd": (0.2, 1.7), "tcd": (0.3, 1.7), "lcm": (1.0, 1.0)}


def recommended_settings(method: str, kmin: int, kmax: int, base_arch: str = "",
                         embedded_guidance: bool | None = None) -> dict:
    """Steps, eta and guidance a LoRA of ``method`` samples at. A guidance-embedded family (FLUX.1-dev,
    and by the same recipe FLUX.2 and HunyuanVideo; default: FLUX.1 only) gets FLUX's."""
    eta, guidance = RECOMMENDED[method]
    steps = 4 if kmin <= 4 <= kmax else kmin
    if embedded_guidance is None:
        embedded_guidance = base_arch == "flux"
    if embedded_guidance:  # FLUX.1-dev TDD: 8 steps at FLUX guidance 2.0, one pass per step (docs/method.md §2)
        steps, guidance = (8 if kmin <= 8 <= kmax else kmax), 2.0
    return {"tdd_recommended_steps": steps, "tdd_recommended_eta": eta, "tdd_recommended_guidance": guidance}


def build_metadata(*, base_arch: str, method: str, kmin: int, kmax: int, training_steps: int, rank: int,
                   alpha: float, extra: dict | None = None, embedded_guidance: bool | None = None) -> dict[str, str]:
    """safetensors header metadata (all values strings, as the format requires)."""
    meta = {
        "tdd_format_version": TDD_FORMAT_VERSION,
        "tdd_base_arch": base_arch,
        "tdd_method": method,
        "tdd_kmin": kmin,
        "tdd_kmax": kmax,
        "tdd_training_steps": training_steps,
        **recommended_settings(method, kmin, kmax, base_arch, embedded_guidance),
        # kohya-compatible fields other tools read
        "ss_network_module": "networks.lora",
        "ss_network_dim": rank,
        "ss_network_alpha": alpha,
    }
    meta.update(extra or {})
    return {k: str(v) for k, v in meta.items()}


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """Write ``path`` via a temporary file in the same folder and ``os.replace`` (never half-written)."""
    from safetensors.torch import save_file

    from .fileio import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata or {})


def read_header_metadata(path) -> dict[str, str]:
    """The raw ``__metadata__`` of a safetensors file (reads only the header)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 1024 * 1024:
            raise ValueError(f"{path} is not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    return dict(header.get("__metadata__") or {})


def read_tdd_metadata(path) -> dict:
    """The ``tdd_*`` metadata of a LoRA file, typed (ints/floats parsed); ``{}`` when it has none.

    Unparseable values are left out rather than raising, so a loader can fall back to defaults.
    """
    out = {}
    for key, value in read_header_metadata(path).items():
        if not key.startswith("tdd_"):
            continue
        kind = TDD_METADATA_TYPES.get(key, str)
        try:
            out[key] = kind(float(value)) if kind is int else kind(value)
        except (TypeError, ValueError):
            continue
    return out

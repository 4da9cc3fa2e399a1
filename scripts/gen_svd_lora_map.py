"""Generate ``nodes/data/svd_lora_map.json``: diffusers' SVD UNet module names -> ComfyUI's video UNet weights.

The SVD-xt TDD LoRA (docs/method.md section 6) was trained on diffusers' ``UNetSpatioTemporalConditionModel``,
so its keys name diffusers modules (``down_blocks.0.resnets.0.temporal_res_block.conv1``); ComfyUI 0.3.75
maps only the image-UNet part of those names onto its own video UNet. This script derives the whole
mapping from the two real architectures, both built on the meta device (no weights, no download):

1. diffusers' ``UNetSpatioTemporalConditionModel()`` at its default (SVD-xt) config: every Linear/Conv.
2. ComfyUI's SVD UNet at the equivalent config (checked to be the host's ``SVD_img2vid`` model): every
   Linear/Conv.
3. The image-UNet names come from ComfyUI's own diffusers table (``comfy.utils.unet_to_diffusers``),
   which also says which ComfyUI block each diffusers block is (the common prefix of its weights).
   SVD adds four kinds of module to those blocks, and each is placed by one rule:
   ``resnets.N.spatial_res_block.X`` is the image res block's X; ``resnets.N.temporal_res_block.X`` is
   the same X under the block's ``time_stack``; ``attentions.N.temporal_transformer_blocks.K`` is the
   block's ``time_stack.K``; ``attentions.N.time_pos_embed`` is laid out like ``time_embedding``.
4. Checks: every diffusers module gets a ComfyUI module with a weight of the same shape, no two share
   one, and every ComfyUI Linear/Conv is reached (a bijection); any failure stops the script.

Usage (in the project venv, with the test-only requirement ``diffusers`` installed)::

    .venv/bin/python scripts/gen_svd_lora_map.py            # (re)write nodes/data/svd_lora_map.json
    .venv/bin/python scripts/gen_svd_lora_map.py --check    # exit 1 if the committed file is stale
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

log = logging.getLogger("gen_svd_lora_map")

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "nodes" / "data" / "svd_lora_map.json"
LINEAR_CONV = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


class MappingError(RuntimeError):
    """The two architectures could not be matched; the message names the module."""


def ensure_comfy() -> None:
    """Make ComfyUI importable ($COMFYUI_PATH or <repo>/.host/ComfyUI) in CPU mode."""
    if "comfy" not in sys.modules:
        root = Path(os.environ.get("COMFYUI_PATH") or REPO / ".host" / "ComfyUI").resolve()
        if not (root / "comfy").is_dir():
            raise SystemExit(f"ComfyUI not found at {root}: run scripts/bootstrap.sh or set COMFYUI_PATH")
        sys.path.insert(0, str(root))
    if "comfy.model_management" not in sys.modules:
        import comfy.cli_args

        if not torch.cuda.is_available():
            comfy.cli_args.args.cpu = True


def linear_conv_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Module path -> weight shape for every Linear/Conv in ``module``."""
    return {name: tuple(m.weight.shape) for name, m in module.named_modules() if isinstance(m, LINEAR_CONV)}


def diffusers_svd_unet():
    """diffusers' UNetSpatioTemporalConditionModel at its default (SVD-xt) config, on the meta device."""
    from diffusers import UNetSpatioTemporalConditionModel

    with torch.device("meta"):
        return UNetSpatioTemporalConditionModel()


def comfy_unet_config(cfg) -> dict:
    """ComfyUI's unet_config for the diffusers SVD config ``cfg`` (what ComfyUI detects from an SVD checkpoint)."""
    channels = list(cfg.block_out_channels)
    n_levels = len(channels)
    depth = cfg.transformer_layers_per_block
    depth = [depth] * n_levels if isinstance(depth, int) else list(depth)
    has_attention = ["CrossAttn" in t for t in cfg.down_block_types]
    per_level = [d if a else 0 for d, a in zip(depth, has_attention)]
    up_attention = ["CrossAttn" in t for t in cfg.up_block_types]
    per_level_out = [d if a else 0 for d, a in zip(reversed(depth), up_attention)]
    depth_output = [d for d in per_level_out for _ in range(cfg.layers_per_block + 1)]
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": cfg.projection_class_embeddings_input_dim,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "model_channels": channels[0],
        "num_res_blocks": [cfg.layers_per_block] * n_levels,
        "channel_mult": [c // channels[0] for c in channels],
        "transformer_depth": [d for d in per_level for _ in range(cfg.layers_per_block)],
        "transformer_depth_output": depth_output[::-1],  # ComfyUI lists output blocks last to first
        "transformer_depth_middle": depth[-1], "use_linear_in_transformer": True,
        "context_dim": cfg.cross_attention_dim,
        # the video part, as comfy.model_detection sets it for SVD checkpoints
        "extra_ff_mix_layer": True, "use_spatial_context": True, "merge_strategy": "learned_with_images",
        "merge_factor": 0.0, "video_kernel_size": [3, 1, 1], "use_temporal_resblock": True,
        "use_temporal_attention": True, "disable_temporal_crossattention": False,
    }


def comfy_svd_unet(unet_config: dict):
    """ComfyUI's video UNet for ``unet_config`` on the meta device; must be the host's SVD_img2vid model."""
    ensure_comfy()
    import comfy.model_detection
    import comfy.supported_models

    model_config = comfy.model_detection.model_config_from_unet_config(unet_config)
    if type(model_config) is not comfy.supported_models.SVD_img2vid:
        raise MappingError(f"ComfyUI takes this config for {type(model_config).__name__}, not SVD_img2vid")
    return model_config.get_model({}, device=torch.device("meta")).diffusion_model


def image_unet_names(unet_config: dict) -> dict[str, str]:
    """diffusers image-UNet module path -> ComfyUI module path, from ComfyUI's own table."""
    ensure_comfy()
    import comfy.utils

    return {d[: -len(".weight")]: c[: -len(".weight")]
            for d, c in comfy.utils.unet_to_diffusers(unet_config).items() if d.endswith(".weight")}


def common_prefix(paths: list[str]) -> str:
    """The longest dotted prefix shared by ``paths``."""
    parts = [p.split(".") for p in paths]
    out = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        out.append(column[0])
    return ".".join(out)


def block_of(image_names: dict[str, str], block: str) -> str:
    """ComfyUI's block for the diffusers block ``block`` (e.g. down_blocks.0.resnets.0 -> input_blocks.1.0)."""
    inside = [c for d, c in image_names.items() if d.startswith(block + ".")]
    if not inside:
        raise MappingError(f"ComfyUI's table has no weights under diffusers block {block}")
    return common_prefix(inside)


def relative(image_names: dict[str, str], block: str, sub: str) -> str:
    """ComfyUI's name of image-UNet module ``block.sub``, relative to its ComfyUI block."""
    full = image_names.get(f"{block}.{sub}")
    if full is None:
        raise MappingError(f"ComfyUI's table has no module {block}.{sub}")
    return full[len(block_of(image_names, block)) + 1:]


def comfy_name(path: str, image_names: dict[str, str]) -> str:
    """ComfyUI module path for diffusers SVD module ``path`` (the rules of the module docstring)."""
    for marker, to_comfy in (
        (".spatial_res_block.", lambda b, s: f"{block_of(image_names, b)}.{relative(image_names, b, s)}"),
        (".temporal_res_block.", lambda b, s: f"{block_of(image_names, b)}.time_stack.{relative(image_names, b, s)}"),
        (".temporal_transformer_blocks.", lambda b, s: f"{block_of(image_names, b)}.time_stack.{s}"),
        (".time_pos_embed.", lambda b, s: f"{block_of(image_names, b)}.time_pos_embed."
                                          f"{relative(image_names, 'time_embedding', s)}"),
    ):
        if marker in path:
            block, sub = path.split(marker, 1)
            return to_comfy(block, sub)
    if path not in image_names:
        raise MappingError(f"no rule and no ComfyUI table entry for diffusers module {path}")
    return image_names[path]


def derive_map() -> dict:
    """The checked mapping and its provenance, as written to nodes/data/svd_lora_map.json."""
    import diffusers

    ensure_comfy()
    import comfyui_version

    unet = diffusers_svd_unet()
    unet_config = comfy_unet_config(unet.config)
    theirs = linear_conv_shapes(unet)
    ours = linear_conv_shapes(comfy_svd_unet(unet_config))
    image_names = image_unet_names(unet_config)
    modules = {}
    for path, shape in sorted(theirs.items()):
        target = comfy_name(path, image_names)
        if target not in ours:
            raise MappingError(f"{path} -> {target}: ComfyUI's SVD UNet has no Linear/Conv there")
        if ours[target] != shape:
            raise MappingError(f"{path} -> {target}: shapes differ, {shape} vs {ours[target]}")
        modules[path] = [target, list(shape)]
    targets = [t for t, _ in modules.values()]
    if len(set(targets)) != len(targets):
        raise MappingError("two diffusers modules map onto one ComfyUI module")
    if set(targets) != set(ours):
        raise MappingError(f"ComfyUI modules no diffusers module reaches: {sorted(set(ours) - set(targets))[:5]}")
    log.info("%d diffusers modules -> %d ComfyUI modules, shapes equal", len(modules), len(ours))
    return {
        "about": "diffusers UNetSpatioTemporalConditionModel module -> [ComfyUI diffusion_model module, weight "
                 "shape], generated by scripts/gen_svd_lora_map.py; do not edit",
        "diffusers": diffusers.__version__,
        "comfyui": comfyui_version.__version__,
        "diffusers_config": {k: v for k, v in unet.config.items() if not k.startswith("_")},
        "count": len(modules),
        "modules": modules,
    }


def render(data: dict) -> str:
    """JSON text with one module per line (readable diffs)."""
    head = json.dumps({k: v for k, v in data.items() if k != "modules"}, sort_keys=True, indent=1)
    rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(data["modules"].items()))
    return head[:-2] + ',\n "modules": {\n' + rows + "\n }\n}\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="where to write the JSON")
    parser.add_argument("--check", action="store_true", help="only compare with --out; exit 1 if it differs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    text = render(derive_map())
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            log.error("%s is stale: run scripts/gen_svd_lora_map.py", args.out)
            return 1
        log.info("%s is up to date", args.out)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""LoRA target sets and trainable blocks of a host model (imports ComfyUI inside its functions only).

Three module sets, one per ``Row.lora`` value of :mod:`trainer.families.table`:

- :func:`host_targets` ("host", every family without a row): each Linear layer inside the model's
  repeated blocks (the ``ModuleList`` children of ``diffusion_model``: a transformer's blocks), named
  ``lora_unet_<module path with _>``, the generic key ``comfy.lora.model_lora_keys_unet`` maps for
  every family, so the stock LoraLoader loads every module;
- :func:`kohya_unet_targets` ("kohya-unet", SD1.5/SD2.x/SDXL): docs/method.md §5 step 9's set under
  diffusers names through ``comfy.utils.unet_to_diffusers`` (the released SD TDD LoRAs' format);
- :func:`flux_peft_targets` ("flux-peft", FLUX.1): the released FLUX TDD LoRA's set through
  ``comfy.utils.flux_to_diffusers``; q, k and v are slices of the fused layers.
"""
from __future__ import annotations

import re

import torch

from ..flow import FLUX_LORA_MODULE_RE
from ..lora import OutputSlice

#: The LoRA module set of docs/method.md §5 (step 9), as diffusers module paths.
LORA_TARGET_RE = re.compile(
    r"(\.attn[12]\.to_(q|k|v|out\.0)|\.attentions\.\d+\.proj_(in|out)|\.ff\.net\.(0\.proj|2)"
    r"|\.resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|\.(down|up)samplers\.0\.conv)\.weight$")
_PEFT_SUFFIX = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}


def block_lists(model) -> list[tuple[str, torch.nn.ModuleList]]:
    """(name, list) of the repeated blocks of a host model's ``diffusion_model``: its ModuleList
    children, in definition order (FLUX: double_blocks, single_blocks; Wan: blocks; ...)."""
    return [(name, child) for name, child in model.diffusion_model.named_children()
            if isinstance(child, torch.nn.ModuleList) and len(child)]


def host_targets(model) -> dict[str, torch.nn.Module]:
    """``lora_unet_<path>`` -> Linear for every Linear inside the repeated blocks whose generic key the
    host's LoRA key map knows (all of them, on every family checked: tests/test_families.py)."""
    import comfy.lora

    known = comfy.lora.model_lora_keys_unet(model, {})
    out = {}
    for list_name, blocks in block_lists(model):
        for name, module in blocks.named_modules():
            if isinstance(module, torch.nn.Linear) and name:
                key = "lora_unet_" + f"{list_name}.{name}".replace(".", "_")
                if key in known:
                    out[key] = module
    return out


def kohya_unet_targets(model) -> dict[str, torch.nn.Module]:
    """kohya prefix -> UNet layer for §5's module set, through ComfyUI's diffusers<->ldm key map
    (``comfy.utils.unet_to_diffusers``). Works on a meta-device model (only names and layer types are read)."""
    import comfy.utils

    unet, out = model.diffusion_model, {}
    for dkey, ldm_key in comfy.utils.unet_to_diffusers(model.model_config.unet_config).items():
        if not LORA_TARGET_RE.search("." + dkey):
            continue
        try:
            module = unet.get_submodule(ldm_key[: -len(".weight")])
        except AttributeError:
            continue
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            out["lora_unet_" + dkey[: -len(".weight")].replace(".", "_")] = module
    return out


def flux_peft_targets(model) -> tuple[dict[str, torch.nn.Module | OutputSlice], dict[str, str]]:
    """The released FLUX TDD LoRA's module set (docs/method.md §5.1) on a host FLUX model, through
    ComfyUI's diffusers<->ldm key map (``comfy.utils.flux_to_diffusers``): q, k and v become slices of
    the fused ``qkv`` / ``linear1`` layers. -> (kohya-style prefix -> target, prefix -> diffusers path).
    Works on a meta-device model."""
    import comfy.utils

    unet, targets, paths = model.diffusion_model, {}, {}
    for dkey, to in comfy.utils.flux_to_diffusers(model.model_config.unet_config).items():
        path = dkey[: -len(".weight")] if dkey.endswith(".weight") else None
        if path is None or not FLUX_LORA_MODULE_RE.match(path):
            continue
        ldm_key, part = (to, None) if isinstance(to, str) else to
        module = unet.get_submodule(ldm_key[: -len(".weight")])
        prefix = "lora_transformer_" + path.replace(".", "_")
        targets[prefix] = module if part is None else OutputSlice(module, part[1], part[2])
        paths[prefix] = path
    return targets, paths


def peft_file_keys(sd: dict, paths: dict[str, str]) -> dict:
    """``transformer.<diffusers module>.lora_A.weight / lora_B.weight / alpha`` (PEFT names, alpha stored)."""
    out = {}
    for key, value in sd.items():
        prefix, _, suffix = key.partition(".")
        out[f"transformer.{paths[prefix]}.{_PEFT_SUFFIX[suffix]}"] = value
    return out


def unet_layers(model) -> list[torch.nn.Module]:
    """The layers inside each SD UNet block (ResBlocks, transformers, samplers): the host's UNet runs a
    block's layers one by one (``forward_timestep_embed``), never the block's own ``forward``."""
    u = model.diffusion_model
    return [layer for block in (*u.input_blocks, u.middle_block, *u.output_blocks) for layer in block]


class _OutOfPlaceAdds(torch.overrides.TorchFunctionMode):
    """``a += b`` computed as ``a + b``: the host's transformer blocks add their residuals in place (an
    inference memory saving), which autograd refuses once a norm has saved the tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.add_ or func is torch.Tensor.__iadd__:
            return torch.add(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def trainable_blocks(blocks) -> None:
    """Let gradients flow through the host's blocks: while grad is enabled (the student's pass, and its
    recomputation under gradient checkpointing) their in-place residual adds become ordinary adds."""
    for block in blocks:
        if getattr(block, "_tdd_grad_safe", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            with _OutOfPlaceAdds():
                return _inner(*args, **kwargs)

        block.forward = forward
        block._tdd_grad_safe = True

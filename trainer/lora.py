"""The student's LoRA: small torch modules attached to a frozen model's Linear/Conv2d layers by hooks.

The teacher is the very same model with the LoRA switched off (:meth:`LoRANetwork.disabled`); no
second copy of the weights exists. Each adapter adds ``(alpha / rank) * up(down(x))`` to its base
layer's output, exactly what a kohya LoRA file means (so the exported file applied at strength 1 by
any kohya-compatible loader reproduces the trained student).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRAAdapter(nn.Module):
    """``lora_down`` / ``lora_up`` for one base layer (Linear, or Conv2d with the base's geometry)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        if isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError("grouped convolutions are not LoRA targets")
            self.kind = "conv"
            self.conv_args = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
            self.down = nn.Parameter(torch.empty(rank, base.in_channels, *base.kernel_size))
            self.up = nn.Parameter(torch.zeros(base.out_channels, rank, 1, 1))
        elif isinstance(base, nn.Linear):
            self.kind = "linear"
            self.down = nn.Parameter(torch.empty(rank, base.in_features))
            self.up = nn.Parameter(torch.zeros(base.out_features, rank))
        else:
            raise TypeError(f"LoRA targets Linear/Conv2d layers, not {type(base).__name__}")

    def reset_parameters(self, generator: torch.Generator) -> None:
        """kohya's init: down ~ kaiming-uniform(a=sqrt(5)), up = 0 (student == teacher at step 0)."""
        fan_in = math.prod(self.down.shape[1:])
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) bound
        with torch.no_grad():
            self.down.copy_(torch.rand(self.down.shape, generator=generator) * 2 * bound - bound)
            self.up.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.down.dtype) if not torch.is_autocast_enabled(x.device.type) else x
        if self.kind == "conv":
            return F.conv2d(F.conv2d(x, self.down, **self.conv_args), self.up) * self.scale
        return F.linear(F.linear(x, self.down), self.up) * self.scale


class LoRANetwork(nn.Module):
    """Adapters keyed by kohya prefix (``lora_unet_...``), hooked into their base layers."""

    def __init__(self, targets: dict[str, nn.Module], rank: int = 64, alpha: float = 8.0, seed: int = 0):
        super().__init__()
        if not targets:
            raise ValueError("no LoRA target modules found")
        self.rank, self.alpha = int(rank), float(alpha)
        self.prefixes = sorted(targets)
        self.adapters = nn.ModuleDict()
        gen = torch.Generator().manual_seed(int(seed))
        for prefix in self.prefixes:
            adapter = LoRAAdapter(targets[prefix], rank, alpha)
            adapter.reset_parameters(gen)
            self.adapters[self._key(prefix)] = adapter
        self.enabled = True
        self._targets = targets
        self._handles = []

    @staticmethod
    def _key(prefix: str) -> str:
        return prefix.replace(".", "_")

    def attach(self) -> "LoRANetwork":
        """Register forward hooks on the base layers (idempotent)."""
        if self._handles:
            return self
        for prefix in self.prefixes:
            adapter = self.adapters[self._key(prefix)]
            self._handles.append(self._targets[prefix].register_forward_hook(self._make_hook(adapter)))
        return self

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make_hook(self, adapter: LoRAAdapter):
        def hook(module, inputs, output):
            if not self.enabled:
                return output
            return output + adapter(inputs[0]).to(output.dtype)
        return hook

    @contextlib.contextmanager
    def disabled(self):
        """The teacher: same weights, LoRA off, inside this block."""
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    # ---- kohya-format state -------------------------------------------------------------------
    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for prefix in self.prefixes:
            a = self.adapters[self._key(prefix)]
            down, up = a.down.detach(), a.up.detach()
            if dtype is not None:
                down, up = down.to(dtype), up.to(dtype)
            out[f"{prefix}.lora_down.weight"] = down.cpu()
            out[f"{prefix}.lora_up.weight"] = up.cpu()
            out[f"{prefix}.alpha"] = torch.tensor(self.alpha)
        return out

    def load_kohya_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        expected = {f"{p}.{s}" for p in self.prefixes for s in ("lora_down.weight", "lora_up.weight", "alpha")}
        missing, unexpected = expected - set(sd), set(sd) - expected
        if missing or unexpected:
            raise ValueError(f"LoRA state does not fit this model: {len(missing)} missing keys "
                             f"(e.g. {sorted(missing)[:2]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]})")
        with torch.no_grad():
            for prefix in self.prefixes:
                a = self.adapters[self._key(prefix)]
                a.down.copy_(sd[f"{prefix}.lora_down.weight"])
                a.up.copy_(sd[f"{prefix}.lora_up.weight"])


def enable_gradient_checkpointing(blocks) -> None:
    """Recompute each block's activations in backward (non-reentrant, so LoRA hooks re-run too)."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        if getattr(block, "_tdd_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
        block._tdd_checkpointed = True

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


class _Weight(nn.Module):
    """Holds one ``weight``, so an adapter's keys read ``lora_down.weight`` as in the file format."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape))


class OutputSlice:
    """A LoRA target that owns ``size`` outputs from ``start`` of a fused Linear (ComfyUI fuses FLUX's
    q/k/v into one ``qkv`` / ``linear1`` layer; the LoRAs for q, k and v each act on their slice)."""

    def __init__(self, base: nn.Linear, start: int, size: int):
        if not isinstance(base, nn.Linear) or start < 0 or start + size > base.out_features:
            raise ValueError(f"bad output slice [{start}, {start + size}) of {base}")
        self.base, self.start, self.size = base, int(start), int(size)
        self.in_features, self.out_features = base.in_features, self.size
        self.pad = (self.start, base.out_features - self.start - self.size)  # F.pad of the last dim


def base_module(target) -> nn.Module:
    """The layer a target's hook goes on (the fused layer for an :class:`OutputSlice`)."""
    return target.base if isinstance(target, OutputSlice) else target


class LoRAAdapter(nn.Module):
    """``lora_down`` / ``lora_up`` / ``alpha`` for one base layer (Linear, or Conv2d with the base's
    geometry): its ``state_dict`` is the file format's keys of that module."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.rank, self.scale = int(rank), float(alpha) / int(rank)
        if isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError("grouped convolutions are not LoRA targets")
            self.kind = "conv"
            self.conv_args = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
            self.lora_down = _Weight(rank, base.in_channels, *base.kernel_size)
            self.lora_up = _Weight(base.out_channels, rank, 1, 1)
        elif isinstance(base, (nn.Linear, OutputSlice)):
            self.kind = "linear"
            self.out_pad = base.pad if isinstance(base, OutputSlice) else None
            self.lora_down = _Weight(rank, base.in_features)
            self.lora_up = _Weight(base.out_features, rank)
        else:
            raise TypeError(f"LoRA targets Linear/Conv2d layers, not {type(base).__name__}")
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    @property
    def down(self) -> nn.Parameter:
        return self.lora_down.weight

    @property
    def up(self) -> nn.Parameter:
        return self.lora_up.weight

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
        out = F.linear(F.linear(x, self.down), self.up) * self.scale
        return out if self.out_pad is None else F.pad(out, self.out_pad)  # zeros outside its slice


class LoRANetwork(nn.Module):
    """Adapters registered under their kohya prefix (``lora_unet_...``), hooked into their base layers.

    ``state_dict()`` is the LoRA file: ``<prefix>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.
    """

    def __init__(self, targets: dict[str, nn.Module], rank: int = 64, alpha: float = 8.0, seed: int = 0):
        super().__init__()
        if not targets:
            raise ValueError("no LoRA target modules found")
        self.rank, self.alpha = int(rank), float(alpha)
        self.prefixes = sorted(targets)
        gen = torch.Generator().manual_seed(int(seed))
        for prefix in self.prefixes:
            if "." in prefix or hasattr(self, prefix):
                raise ValueError(f"bad LoRA module prefix {prefix!r}")
            adapter = LoRAAdapter(targets[prefix], rank, alpha)
            adapter.reset_parameters(gen)
            self.add_module(prefix, adapter)
        self.enabled = True
        self._targets = targets
        self._handles = []

    def adapters(self):
        """(prefix, adapter) pairs in prefix order."""
        return [(p, self.get_submodule(p)) for p in self.prefixes]

    def attach(self) -> "LoRANetwork":
        """Register forward hooks on the base layers (idempotent)."""
        if self._handles:
            return self
        for prefix, adapter in self.adapters():
            self._handles.append(base_module(self._targets[prefix]).register_forward_hook(self._make_hook(adapter)))
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
        """The file's tensors on the CPU: weights in ``dtype`` (default: as trained), alpha in fp32."""
        out = {}
        for k, v in self.state_dict().items():
            v = v.detach()
            if dtype is not None and not k.endswith(".alpha"):
                v = v.to(dtype)
            out[k] = v.float().cpu() if k.endswith(".alpha") else v.cpu()
        return out

    def load_kohya_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        missing, unexpected = expected - set(sd), set(sd) - expected
        if missing or unexpected:
            raise ValueError(f"LoRA state does not fit this model: {len(missing)} missing keys "
                             f"(e.g. {sorted(missing)[:2]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]})")
        self.load_state_dict(sd)


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

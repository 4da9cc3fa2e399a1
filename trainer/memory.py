"""How much memory a distillation needs, estimated from parameter counts, and the check that refuses
a run that can't fit before its first step (docs/families.md, "Memory"). No ComfyUI here.

The estimate at batch ``B`` (bytes):

- the frozen base: ``params x bytes(base dtype)`` (the teacher is the same weights with the LoRA off);
- the LoRA: ``lora_params x 16`` (fp32 value, gradient and AdamW's two moments);
- activations kept for the backward of the student's pass: ``B x tokens x width x blocks x 24 x 2``
  (about 24 bf16 values per token and channel per transformer block: q, k, v, attention output, norms,
  the MLP's 4x hidden twice, residuals); with gradient checkpointing only each block's input
  (``x 1`` instead of ``x 24``) plus one block recomputed at a time;
- 1 GiB for the framework (CUDA context, kernels' workspace).

``tokens`` is the latent's positions after the transformer's patching (frames included), plus the text
states; ``width`` and ``blocks`` are read off the model. It is an estimate: the order of magnitude
and the effect of gradient checkpointing, not a byte count.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 1024 ** 3
ACTIVATION_VALUES = 24      # per token, channel and block without checkpointing (see the module doc)
ACTIVATION_BYTES = 2        # bf16/fp16 autocast
LORA_BYTES_PER_PARAM = 16   # fp32 value + gradient + AdamW exp_avg + exp_avg_sq
FRAMEWORK_BYTES = 1 * GIB
BASE_BYTES = {"fp32": 4, "auto": 4, "bf16": 2, "fp16": 2, "fp8": 1}


@dataclass(frozen=True)
class ModelSize:
    """What the estimate reads off a model: its parameters, transformer width and block count, and
    the tokens one sample puts through each block."""

    params: int
    width: int
    blocks: int
    tokens: int
    lora_params: int = 0


@dataclass(frozen=True)
class Estimate:
    weights: int
    lora: int
    activations: int
    framework: int = FRAMEWORK_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.activations + self.framework

    def gib(self) -> float:
        return self.total / GIB


def estimate(size: ModelSize, *, batch: int = 1, base_dtype: str = "bf16", checkpointing: bool = False,
             rank: int = 64) -> Estimate:
    """The memory of one distillation step (see the module doc). ``size.lora_params`` 0: rank x 18 x
    width per block (q, k, v, out at width x width, the MLP at width x 4 width, twice)."""
    lora_params = size.lora_params or rank * 18 * size.width * size.blocks
    per_block = batch * size.tokens * size.width * ACTIVATION_BYTES
    activations = (per_block * (size.blocks + ACTIVATION_VALUES) if checkpointing
                   else per_block * ACTIVATION_VALUES * size.blocks)
    return Estimate(weights=size.params * BASE_BYTES[base_dtype], lora=lora_params * LORA_BYTES_PER_PARAM,
                    activations=activations)


def fit_problem(family: str, size: ModelSize, available: int, *, batch: int, resolution: int, base_dtype: str,
                checkpointing: bool, rank: int, device: str) -> str | None:
    """None when the run's estimate fits in ``available`` bytes, else the message: what it needs, what
    there is, and the option to try (gradient checkpointing, a smaller base dtype, a lower resolution or
    batch, or sharding the base, in that order of least change)."""
    need = estimate(size, batch=batch, base_dtype=base_dtype, checkpointing=checkpointing, rank=rank)
    if need.total <= available:
        return None
    head = (f"{family} needs about {need.gib():.1f} GiB to distil at batch {batch}, {resolution}px "
            f"({'with' if checkpointing else 'without'} gradient checkpointing, base {base_dtype}: weights "
            f"{need.weights / GIB:.1f}, LoRA and optimizer {need.lora / GIB:.2f}, activations "
            f"{need.activations / GIB:.1f}) but {device} has {available / GIB:.1f} GiB")
    if not checkpointing:
        ck = estimate(size, batch=batch, base_dtype=base_dtype, checkpointing=True, rank=rank)
        if ck.total <= available:
            return (f"{head}: turn on gradient checkpointing (--gradient-checkpointing; TDD Distill's "
                    f"gradient_checkpointing input), about {ck.gib():.1f} GiB")
    for smaller in ("bf16", "fp8"):
        if BASE_BYTES[smaller] < BASE_BYTES[base_dtype]:
            alt = estimate(size, batch=batch, base_dtype=smaller, checkpointing=True, rank=rank)
            if alt.total <= available:
                return (f"{head}: store the frozen base in {smaller} (--base-dtype {smaller}; TDD Distill's base_dtype) "
                        f"with gradient checkpointing, about {alt.gib():.1f} GiB")
    return (f"{head}: lower --resolution or --batch-size, or shard the frozen base across GPUs "
            "(docs/trainer.md, 'A model that does not fit one GPU')")

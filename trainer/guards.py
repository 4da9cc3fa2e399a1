"""Start-up guard rails: settings that run but would not train anything useful get a warning.

The LoRA-movement rule: a run whose learning rate x total samples (global batch x steps) is below
:data:`MIN_LR_SAMPLES` barely changes the student. The threshold comes from bench/lora_movement.py on the
demo model (docs/trainer.md, "Guard rails"): see :data:`MIN_LR_SAMPLES` for the numbers.
"""
from __future__ import annotations

import math

#: Measured with bench/lora_movement.py on the demo model (committed teacher weights, rank 16 / alpha 2,
#: batch 4, 64 px, 4-step TDD output vs the teacher's, mean |pixel change| in [0, 1]):
#:   lr 1e-5 x 40 samples (4e-4): mean change 0.00004 (max 0.003);
#:   lr 1e-4 x 40 samples (4e-3): mean change 0.00039 (max 0.027);
#:   lr 1e-3 x 40 samples (4e-2): mean change 0.0044 (max 0.24).
#: The change grows linearly with lr x samples (about 0.1 x it) over those two decades; a mean change of
#: 0.01 (2.5 grey levels of 255, where a difference starts to show) is reached at about 0.1. (lr 1e-2 at
#: batch 4 is unstable - mean change 0.74 after 10 steps - so larger products say nothing about the rule.)
MIN_LR_SAMPLES = 0.1


def lr_samples_warning(lr: float, global_batch: int, max_steps: int, threshold: float | None = None) -> str | None:
    """The warning for a run that would barely move its LoRA, naming the numbers and the fix; else None."""
    threshold = MIN_LR_SAMPLES if threshold is None else threshold
    samples = global_batch * max_steps
    product = lr * samples
    if product >= threshold:
        return None
    need_steps = math.ceil(threshold / (lr * global_batch) * (1 - 1e-9))
    return (f"this run will barely change its LoRA: lr {lr:g} x {samples} samples (global batch {global_batch} x "
            f"{max_steps} steps) = {product:.2g}, below the {threshold:g} at which the student's 4-step output "
            f"starts to change (measured on the demo model, docs/trainer.md). Raise --max-steps to at least "
            f"{int(need_steps)}, the global batch (--batch-size/--grad-accum, or --preset), or --lr "
            f"(to {threshold / samples:.2g} for these steps)")

"""Non-finite numbers in a queued prompt become a validation error on their own input.

JSON from scripts can carry NaN and Infinity. The host lets them through its checks (NaN compares
false with min and max), runs the prompt, and keeps it in its history, whose JSON the browser then
fails to read. Checking them in a node's ``validate_inputs`` would have the host report the error
on every input that function takes. So this prompt handler, registered with the host's
``PromptServer.add_on_prompt_handler``, turns a non-finite float of a TDD node's input into the text
``"nan (not a finite number)"``: the host's own conversion to FLOAT then refuses exactly that input,
and the prompt never runs.
"""
from __future__ import annotations

import logging
import math

log = logging.getLogger("tdd")


def mark_non_finite(json_data):
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if not isinstance(prompt, dict):
        return json_data
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or not str(node.get("class_type", "")).startswith("TDD"):
            continue
        inputs = node.get("inputs")
        for name, value in (inputs.items() if isinstance(inputs, dict) else ()):
            if isinstance(value, float) and not math.isfinite(value):
                inputs[name] = f"{value} (not a finite number)"
                log.warning("TDD: node %s input %s = %s is not a finite number; the prompt is refused", node_id, name,
                            value)
    return json_data


def register() -> None:
    """Add :func:`mark_non_finite` to the running server's prompt handlers (no server: nothing)."""
    import sys

    instance = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    add = getattr(instance, "add_on_prompt_handler", None)
    if add is not None and mark_non_finite not in getattr(instance, "on_prompt_handlers", []):
        add(mark_non_finite)

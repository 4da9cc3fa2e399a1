"""Refuse bad widget values before a prompt runs: what the pinned host lets through.

ComfyUI 0.3.75 does not check the values of V3 combo inputs, and it passes NaN and infinite floats
(JSON from scripts can carry them). A TDD node's ``validate_inputs`` runs :func:`check_schema`,
which checks every widget value it receives against the node's own schema: combos against their
options, numbers against min/max and finiteness. Naming inputs in ``validate_inputs`` turns off the
host's own min/max check for them, so the range check lives here too. Linked inputs arrive as None
at validation time (their value is not known yet); the nodes whose inputs take linked numbers (TDD
Scheduler, Sampler and Guidance, fed e.g. by the TDD LoRA Loader's settings) check them again when
they execute (:meth:`TDDNode.check_values`).
"""
from __future__ import annotations

import math

from comfy_api.latest import io

MAX_LISTED_OPTIONS = 12


def _allowed(options: list) -> str:
    shown = ", ".join(repr(o) for o in options[:MAX_LISTED_OPTIONS])
    more = len(options) - MAX_LISTED_OPTIONS
    return shown + (f", ... ({len(options)} in all)" if more > 0 else "") if options else "none available"


def combo_problem(name: str, value, options: list, hint: str = "") -> str | None:
    """A message if ``value`` is not one of ``options``."""
    if value in options:
        return None
    message = f"{name} = {value!r} is not an allowed value; allowed: {_allowed(list(options))}"
    return message + (f" ({hint})" if hint else "")


def number_problem(name: str, value, low=None, high=None) -> str | None:
    """A message if ``value`` is not a finite number within ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} = {value!r} is not a number"
    if not math.isfinite(value):
        return f"{name} = {value} is not a finite number; use a value from {low} to {high}"
    if (low is not None and value < low) or (high is not None and value > high):
        return f"{name} = {value} is out of range; allowed: {low} to {high}"
    return None


def input_problem(spec, value, hints: dict | None = None) -> str | None:
    """The problem of one widget value against its schema entry, or None."""
    if value is None:  # linked: checked at execution
        return None
    if isinstance(spec, io.Combo.Input):
        return combo_problem(spec.id, value, list(spec.options or []), (hints or {}).get(spec.id, ""))
    if isinstance(spec, (io.Float.Input, io.Int.Input)):
        return number_problem(spec.id, value, spec.min, spec.max)
    return None


def check_schema(schema: io.Schema, values: dict, hints: dict | None = None) -> bool | str:
    """True, or every problem of ``values`` against ``schema``'s inputs as one message."""
    specs = {spec.id: spec for spec in schema.inputs}
    problems = [p for name, value in values.items() if name in specs
                for p in [input_problem(specs[name], value, hints)] if p]
    return True if not problems else "; ".join(problems)


class TDDNode(io.ComfyNode):
    """Base of the pack's nodes: ``validate_inputs`` checks every widget value against the schema.

    ``INPUT_HINTS`` adds a fix to a combo's message (e.g. where the files of a file list live)."""

    INPUT_HINTS: dict = {}

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_schema(cls.define_schema(), values, cls.INPUT_HINTS)

    @classmethod
    def check_values(cls, **values) -> None:
        """The same check at execution, for values that arrived through links (e.g. the TDD LoRA
        Loader's recommended settings), which validation could not see."""
        checked = cls.validate_inputs(**values)
        if checked is not True:
            raise ValueError(f"{cls.define_schema().display_name}: {checked}")

"""Refuse bad widget values, naming only the input that is wrong.

How the host validates a prompt (ComfyUI 0.3.52 to 0.3.75 alike): it checks number inputs against
their min/max itself, each error naming its input, but only for inputs a node's ``validate_inputs``
does not take. Whatever ``validate_inputs`` returns is reported on every input it takes. It does not
check the values of V3 combo inputs, and it lets NaN and infinite floats through (JSON from scripts
can carry them).

So a TDD node's ``validate_inputs`` takes only the inputs the host can't check (``VALIDATED``: by
default the node's combos, checked against their options by :func:`check_schema`), and the host's
own min/max check stays on for every number. NaN and infinite values are turned into a conversion
error on their own input before validation (``prompt_guard``). Numbers that arrive through links are
checked when the node executes (:meth:`TDDNode.check_values`), with the input named in the message.
"""
from __future__ import annotations

import inspect
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
    """Base of the pack's nodes: ``validate_inputs`` checks the ``VALIDATED`` inputs (default: the
    combos) against the schema, plus :meth:`cross_check`; it takes exactly those inputs, so the host
    reports a failure on them alone and checks every other number's range itself.

    ``INPUT_HINTS`` adds a fix to a combo's message (e.g. where the files of a file list live)."""

    INPUT_HINTS: dict = {}
    VALIDATED: tuple[str, ...] | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("validate_inputs")
        if own is not None and getattr(getattr(own, "__func__", None), "tdd_signature", False):
            return  # the host's per-run copy of a node class: already set up
        names = cls.VALIDATED
        if names is None:
            names = tuple(spec.id for spec in cls.define_schema().inputs if isinstance(spec, io.Combo.Input))

        def validate_inputs(cls, **values) -> bool | str:
            return cls.check_inputs(**values)

        P = inspect.Parameter
        validate_inputs.tdd_signature = True
        validate_inputs.__signature__ = inspect.Signature(
            [P("cls", P.POSITIONAL_OR_KEYWORD)] + [P(n, P.POSITIONAL_OR_KEYWORD, default=None) for n in names])
        cls.validate_inputs = classmethod(validate_inputs)

    @classmethod
    def check_inputs(cls, **values) -> bool | str:
        checked = check_schema(cls.define_schema(), values, cls.INPUT_HINTS)
        if checked is not True:
            return checked
        return cls.cross_check(**values) or True

    @classmethod
    def cross_check(cls, **values) -> str | None:
        """A problem between the validated inputs' values (None: none); for nodes to override."""
        return None

    @classmethod
    def check_values(cls, **values) -> None:
        """The check at execution, for numbers that arrived through links (e.g. the TDD LoRA Loader's
        recommended settings) and NaN/infinite values, which validation could not see."""
        checked = check_schema(cls.define_schema(), values, cls.INPUT_HINTS)
        if checked is True:
            checked = cls.cross_check(**values) or True
        if checked is not True:
            raise ValueError(f"{cls.define_schema().display_name}: {checked}")

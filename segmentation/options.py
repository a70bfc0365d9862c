"""Config values checked one at a time: an ``Option`` (default, kind, range, choices) and a value converted to it.

``segmentation.config`` declares the schema as one ``Option`` per key; ``check_value`` turns what YAML
or a ``key=value`` override gave into the option's type or raises a ValueError that names the key.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

KINDS = (
    "int",
    "float",
    "bool",
    "str",
    "int_list",
    "float_list",
    "weights",  # balanced, none or one weight per class
    "search_space",  # {section.key: [choices] | {log_uniform | uniform: [low, high]}}
    "threshold",  # a number or auto
    "number_list",  # distinct numbers
    "colour_list",  # distinct [r, g, b]
    "int_or_auto",
    "int_or_all",
    "bool_or_auto",
)
SEARCH_RANGES = ("log_uniform", "uniform")


@dataclass(frozen=True)
class Option:
    """One config key: its default (plain YAML data), its kind (one of ``KINDS``) and the values it accepts."""

    default: Any
    kind: str
    help: str
    choices: tuple = ()
    minimum: float | None = None  # inclusive
    maximum: float | None = None  # inclusive
    above: float | None = None  # exclusive lower bound
    nullable: bool = False
    aliases: dict = field(default_factory=dict)  # legacy value -> canonical value


def suggest(name: str, known: Sequence[str]) -> str:
    """`` (did you mean X?)`` for the known name closest to ``name``, or nothing."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f" (did you mean {close[0]}?)" if close else ""


def check_value(name: str, option: Option, value: Any, searchable: dict[str, Option] | None = None) -> Any:
    """``value`` converted to the option's kind (plain data: lists stay lists), or a ValueError naming
    ``name``. ``searchable`` gives the option of each ``section.key`` that a search space may set."""
    if value is None:
        if option.nullable:
            return None
        raise ValueError(f"{name}: a value is required ({option.help})")
    value = option.aliases.get(value, value) if isinstance(value, str) else value
    if option.kind == "search_space":
        return _search_space(name, value, searchable or {})
    if option.kind in ("weights", "number_list", "colour_list"):
        return _class_list(name, option.kind, value)
    value = _converted(name, option.kind, value)
    if option.choices and value not in option.choices:
        choices = list(map(str, option.choices))
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(choices)}{suggest(str(value), choices)}")
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            _check_range(name, option, item)
    return value


def _converted(name: str, kind: str, value: Any) -> Any:
    """A scalar or list ``value`` as ``kind``, before its range and choices are checked."""
    if kind == "int":
        return _as_int(name, value)
    if kind == "float":
        return _as_float(name, value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true or false, got {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name}: expected a text value, got {value!r}")
        return value
    if kind in ("int_list", "float_list"):
        example = "integers such as [16, 32, 64]" if kind == "int_list" else "numbers such as [0.85, 1.0, 1.2]"
        if not isinstance(value, list) or not value:
            raise ValueError(f"{name}: expected a list of {example}, got {value!r}")
        return [(_as_int if kind == "int_list" else _as_float)(name, item) for item in value]
    if kind == "threshold":
        return value if value == "auto" else _as_float(name, value)
    if kind == "bool_or_auto":
        if value != "auto" and not isinstance(value, bool):
            raise ValueError(f"{name}: expected true, false or auto, got {value!r}")
        return value
    if kind in ("int_or_auto", "int_or_all"):
        word = kind.removeprefix("int_or_")
        if value == word:
            return value
        if isinstance(value, str):
            raise ValueError(f"{name}: expected an integer or {word}, got {value!r}")
        return _as_int(name, value)
    raise ValueError(f"{name}: unknown kind of option {kind!r}")


def _class_list(name: str, kind: str, value: Any) -> Any:
    """One entry per class: class weights (or balanced / none), mask values, or mask colours."""
    if kind == "weights" and value in ("balanced", "none"):
        return value
    expected = {
        "weights": "balanced, none or a list of one weight per class",
        "number_list": "a list of numbers such as [0, 128, 255]",
        "colour_list": "a list of [r, g, b] colours such as [[0, 0, 0], [255, 0, 0]]",
    }[kind]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    if kind == "colour_list":
        if not all(isinstance(colour, list) and len(colour) == 3 for colour in value):
            raise ValueError(f"{name}: expected {expected}, got {value!r}")
        value = [[_as_int(name, channel) for channel in colour] for colour in value]
        distinct = len({tuple(colour) for colour in value}) == len(value)
        if any(not 0 <= channel <= 255 for colour in value for channel in colour) or not distinct:
            raise ValueError(f"{name}: colours are distinct [r, g, b] of 0..255, got {value}")
        return value
    value = [_as_float(name, item) for item in value]
    if kind == "weights" and (any(item < 0 for item in value) or not any(item > 0 for item in value)):
        raise ValueError(f"{name}: class weights must be >= 0 and not all 0, got {value}")
    if kind == "number_list" and len(set(value)) != len(value):
        raise ValueError(f"{name}: each value may stand for one class only, got {value}")
    return value


def _search_space(name: str, space: Any, searchable: dict[str, Option]) -> dict:
    """A search space ``{section.key: [choices] | {log_uniform | uniform: [low, high]}}``, its choices and
    range ends checked and converted as the option of their key says; ValueError names the entry."""
    if not isinstance(space, dict) or not space:
        example = "{train.lr: {log_uniform: [1e-4, 1e-2]}, train.optim: [adam, adamw]}"
        raise ValueError(f"{name}: expected a mapping such as {example}, got {space!r}")
    checked = {}
    for target, values in space.items():
        entry = f"{name}: {target}"
        option = searchable.get(target)
        if option is None:
            raise ValueError(f"{entry}: not a key that a search can set{suggest(str(target), list(searchable))}")
        if isinstance(values, list) and values:
            checked[target] = [check_value(entry, option, value) for value in values]
        elif isinstance(values, dict) and len(values) == 1 and next(iter(values)) in SEARCH_RANGES:
            ((kind, ends),) = values.items()
            if option.kind != "float":
                raise ValueError(f"{entry}: a {kind} range needs a number key; list the choices of {target} instead")
            if not isinstance(ends, list) or len(ends) != 2:
                raise ValueError(f"{entry}: {kind} takes [low, high], got {ends!r}")
            low, high = (check_value(entry, option, end) for end in ends)
            if not low < high or (kind == "log_uniform" and low <= 0):
                needs = "0 < low < high" if kind == "log_uniform" else "low < high"
                raise ValueError(f"{entry}: {kind} needs {needs}, got [{low}, {high}]")
            checked[target] = {kind: [low, high]}
        else:
            raise ValueError(
                f"{entry}: expected a list of choices, {{log_uniform: [low, high]}} or {{uniform: [low, high]}}, "
                f"got {values!r}"
            )
    return checked


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    return value


def _as_float(name: str, value: Any) -> float:
    # YAML 1.1 reads 1e-5 (no dot) as text, so numbers written that way arrive as strings.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def _check_range(name: str, option: Option, value: float) -> None:
    if option.minimum is not None and value < option.minimum:
        raise ValueError(f"{name}: must be >= {option.minimum}, got {value}")
    if option.maximum is not None and value > option.maximum:
        raise ValueError(f"{name}: must be <= {option.maximum}, got {value}")
    if option.above is not None and value <= option.above:
        raise ValueError(f"{name}: must be > {option.above}, got {value}")

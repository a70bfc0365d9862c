"""Config values checked one at a time: an ``Option`` (default, kind, range, choices) and a value converted to it.

``segmentation.config`` declares the schema as one ``Option`` per key; ``check_value`` turns what YAML
or a ``key=value`` override gave into the option's type or raises a ValueError that names the key.
The scripts' command-line options are checked alike, by the argparse types at the end (``positive_int``,
``int_list``, ...) and ``OneLineParser``, which reports a wrong option in one line.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import reprlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

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
INT_LIMIT = 2**63 - 1  # int64, what PyTorch and NumPy take: no count, size or seed means anything beyond it
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?|mps"  # train.device and bench.py --device
SHOWN_LENGTH = 100  # characters of a value quoted in a message: a hostile value must not make a huge line


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


class _BoundedRepr(reprlib.Repr):
    """``reprlib``'s repr, which shows a few items per list and a few levels (so that it never walks a
    huge or alias-shared structure); integers too long to print are shown by their size."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxdict, self.maxstring, self.maxother = 3, 8, 8, SHOWN_LENGTH, SHOWN_LENGTH

    def repr_int(self, value: int, level: int) -> str:
        return _magnitude(value) if abs(value).bit_length() > 64 else repr(value)


_BOUNDED_REPR = _BoundedRepr()


def _magnitude(value: int) -> str:
    """A huge integer by its size, ``about 10**100`` (Python refuses to print one of over 4300 digits)."""
    return f"{'-' if value < 0 else ''}about 10**{int(abs(value).bit_length() * math.log10(2))}"


def clipped(text: str) -> str:
    """``text`` for a one-line message: control characters escaped and at most ``SHOWN_LENGTH`` characters."""
    text = text if text.isprintable() else repr(text)[1:-1]
    return text if len(text) <= SHOWN_LENGTH else f"{text[: SHOWN_LENGTH - 3]}..."


def shown(value: Any) -> str:
    """The repr of ``value`` for a one-line message, short however large or deep ``value`` is."""
    return clipped(_BOUNDED_REPR.repr(value))


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
        raise ValueError(f"{name}: {shown(value)} is not one of {', '.join(choices)}{suggest(str(value), choices)}")
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
            raise ValueError(f"{name}: expected true or false, got {shown(value)}")
        return value
    if kind == "str":
        if not isinstance(value, str) or not value:
            read_as = (
                "" if isinstance(value, (str, list, dict)) else f" (YAML reads it as {type(value).__name__}: quote it)"
            )
            raise ValueError(f"{name}: expected a text value, got {shown(value)}{read_as}")
        return value
    if kind in ("int_list", "float_list"):
        example = "integers such as [16, 32, 64]" if kind == "int_list" else "numbers such as [0.85, 1.0, 1.2]"
        if not isinstance(value, list) or not value:
            raise ValueError(f"{name}: expected a list of {example}, got {shown(value)}")
        return [(_as_int if kind == "int_list" else _as_float)(name, item) for item in value]
    if kind == "threshold":
        return value if value == "auto" else _as_float(name, value)
    if kind == "bool_or_auto":
        if value != "auto" and not isinstance(value, bool):
            raise ValueError(f"{name}: expected true, false or auto, got {shown(value)}")
        return value
    if kind in ("int_or_auto", "int_or_all"):
        word = kind.removeprefix("int_or_")
        if value == word:
            return value
        if isinstance(value, str):
            raise ValueError(f"{name}: expected an integer or {word}, got {shown(value)}")
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
        raise ValueError(f"{name}: expected {expected}, got {shown(value)}")
    if kind == "colour_list":
        if not all(isinstance(colour, list) and len(colour) == 3 for colour in value):
            raise ValueError(f"{name}: expected {expected}, got {shown(value)}")
        value = [[_as_int(name, channel) for channel in colour] for colour in value]
        distinct = len({tuple(colour) for colour in value}) == len(value)
        if any(not 0 <= channel <= 255 for colour in value for channel in colour) or not distinct:
            raise ValueError(f"{name}: colours are distinct [r, g, b] of 0..255, got {shown(value)}")
        return value
    value = [_as_float(name, item) for item in value]
    if kind == "weights" and (any(item < 0 for item in value) or not any(item > 0 for item in value)):
        raise ValueError(f"{name}: class weights must be >= 0 and not all 0, got {shown(value)}")
    if kind == "number_list" and len(set(value)) != len(value):
        raise ValueError(f"{name}: each value may stand for one class only, got {shown(value)}")
    return value


def _search_space(name: str, space: Any, searchable: dict[str, Option]) -> dict:
    """A search space ``{section.key: [choices] | {log_uniform | uniform: [low, high]}}``, its choices and
    range ends checked and converted as the option of their key says; ValueError names the entry."""
    if not isinstance(space, dict) or not space:
        example = "{train.lr: {log_uniform: [1e-4, 1e-2]}, train.optim: [adam, adamw]}"
        raise ValueError(f"{name}: expected a mapping such as {example}, got {shown(space)}")
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
                raise ValueError(f"{entry}: {kind} takes [low, high], got {shown(ends)}")
            low, high = (check_value(entry, option, end) for end in ends)
            if not low < high or (kind == "log_uniform" and low <= 0):
                needs = "0 < low < high" if kind == "log_uniform" else "low < high"
                raise ValueError(f"{entry}: {kind} needs {needs}, got [{low}, {high}]")
            checked[target] = {kind: [low, high]}
        else:
            raise ValueError(
                f"{entry}: expected a list of choices, {{log_uniform: [low, high]}} or {{uniform: [low, high]}}, "
                f"got {shown(values)}"
            )
    return checked


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an integer, got {shown(value)}")
    if abs(value) > INT_LIMIT:
        raise ValueError(f"{name}: {shown(value)} is beyond any integer setting (at most 2**63 - 1)")
    return value


def _as_float(name: str, value: Any) -> float:
    # YAML 1.1 reads 1e-5 (no dot) as text, so numbers written that way arrive as strings.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{name}: expected a number, got {shown(value)}") from None
    try:
        number = math.nan if isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)
    except OverflowError:  # an integer beyond the floats, such as 10**400
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name}: expected a finite number, got {shown(value)}")
    return number


def _check_range(name: str, option: Option, value: float) -> None:
    if option.minimum is not None and value < option.minimum:
        raise ValueError(f"{name}: must be >= {option.minimum}, got {value}")
    if option.maximum is not None and value > option.maximum:
        raise ValueError(f"{name}: must be <= {option.maximum}, got {value}")
    if option.above is not None and value <= option.above:
        raise ValueError(f"{name}: must be > {option.above}, got {value}")


class OneLineParser(argparse.ArgumentParser):
    """An ``argparse`` parser that reports a wrong option in one line (argparse's own error prints the
    whole usage first), exit code 2 as argparse's."""

    def error(self, message: str) -> NoReturn:
        message = message.replace("\n", " ")  # the values in it are the user's, shown short by the types
        self.exit(2, f"{self.prog}: error: {message}; {self.prog} --help lists the options\n")


def _argument(text: str, convert: Callable[[str], Any], valid: Callable[[Any], bool], expected: str) -> Any:
    """``convert(text)`` where ``valid`` accepts it, else argparse's one-line error saying what was ``expected``."""
    try:
        value = convert(text)
    except ValueError:  # not a number, or an integer of over 4300 digits
        value = None
    if value is None or not valid(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {shown(text)}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer from 1 to ``INT_LIMIT`` (a count, a size, epochs)."""
    return _argument(text, int, lambda value: 0 < value <= INT_LIMIT, "a positive integer")


def non_negative_int(text: str) -> int:
    """An argparse type: an integer from 0 to ``INT_LIMIT`` (0 meaning none or off)."""
    return _argument(text, int, lambda value: 0 <= value <= INT_LIMIT, "an integer >= 0")


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    return _argument(text, float, lambda value: 0 < value < math.inf, "a number above 0")


def int_list(text: str) -> list[int]:
    """An argparse type: positive integers separated by commas, such as ``64,128,256``."""
    expected = "positive integers separated by commas, such as 64,128,256"
    return _argument(text, _comma_ints, lambda values: all(0 < value <= INT_LIMIT for value in values), expected)


def index_list(count: int) -> Callable[[str], list[int]]:
    """An argparse type: numbers from 0 to ``count - 1`` separated by commas, such as ``0,2,4``."""

    def indices(text: str) -> list[int]:
        expected = f"numbers from 0 to {count - 1} separated by commas, such as 0,2"
        return _argument(text, _comma_ints, lambda values: all(0 <= value < count for value in values), expected)

    return indices


def _comma_ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",")]


def word_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: some of ``choices``, separated by commas (``ours,bare``)."""

    def some_of(text: str) -> list[str]:
        expected = f"some of {', '.join(choices)} separated by commas"
        return _argument(text, lambda given: given.split(","), lambda values: set(values) <= set(choices), expected)

    return some_of


def device_name(text: str) -> str:
    """An argparse type: a device as ``train.device`` takes it (whether it is present is checked when used)."""
    return _argument(
        text, str, lambda value: re.fullmatch(DEVICE_PATTERN, value) is not None, "auto, cpu, cuda, cuda:N or mps"
    )


def path_argument(text: str) -> Path:
    """An argparse type: a path; an empty one is refused (``Path('')`` would be the current folder)."""
    return _argument(text, Path, lambda _: bool(text) and "\0" not in text, "a file or folder path")


def named_counts(names: Sequence[str]) -> Callable[[str], dict[str, int]]:
    """An argparse type: ``NAME=COUNT`` pairs separated by commas, each name one of ``names`` and each count a
    positive integer (``nuclei=40,isbi=20``)."""

    def counts(text: str) -> dict[str, int]:
        expected = f"NAME=COUNT pairs separated by commas, NAME one of {', '.join(names)}, such as {names[0]}=10"
        return _argument(
            text,
            _pairs,
            lambda pairs: set(pairs) <= set(names) and all(0 < count <= INT_LIMIT for count in pairs.values()),
            expected,
        )

    return counts


def named_count_pairs(names: Sequence[str]) -> Callable[[str], dict[str, tuple[int, int]]]:
    """An argparse type: ``NAME=A:B`` items separated by commas, each name one of ``names`` and ``A``, ``B``
    positive integers (``damaged=30:20,isbi=10:20``)."""

    def counts(text: str) -> dict[str, tuple[int, int]]:
        expected = f"NAME=A:B items separated by commas, NAME one of {', '.join(names)}, such as {names[0]}=20:20"

        def parse(given: str) -> dict[str, tuple[int, int]]:
            return {name: tuple(int(part) for part in pair.split(":")) for name, pair in _items(given)}

        def valid(pairs: dict) -> bool:
            numbers = [value for pair in pairs.values() for value in pair]
            return (
                set(pairs) <= set(names)
                and all(len(pair) == 2 for pair in pairs.values())
                and all(0 < value <= INT_LIMIT for value in numbers)
            )

        return _argument(text, parse, valid, expected)

    return counts


def named_paths(names: Sequence[str]) -> Callable[[str], dict[str, Path]]:
    """An argparse type: ``NAME=PATH`` pairs separated by commas, each name one of ``names``
    (``nnunet=envs/nnunet/bin/python``)."""

    def paths(text: str) -> dict[str, Path]:
        expected = f"NAME=PATH pairs separated by commas, NAME one of {', '.join(names)}, such as {names[0]}=PATH"

        def parse(given: str) -> dict[str, Path]:
            return {name: Path(path) for name, path in _items(given) if path}

        return _argument(text, parse, lambda pairs: bool(pairs) and set(pairs) <= set(names), expected)

    return paths


def _items(text: str) -> list[tuple[str, str]]:
    return [(name, value) for name, _, value in (item.partition("=") for item in text.split(","))]


def _pairs(text: str) -> dict[str, int]:
    return {name: int(count) for name, _, count in (item.partition("=") for item in text.split(","))}

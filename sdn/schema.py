"""Checking a mapping read from YAML against a dataclass: unknown (misspelt) keys, wrong types and
out-of-range numbers stop with a `ConfigError` naming the dotted key and what was expected.

A numeric field carries its range in its metadata (`ranged`), which `build_section` reads: the
range sits beside the field it limits. Importing this module needs neither torch nor the models.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sdn.errors import ConfigError, did_you_mean

RANGE = "range"  # the metadata key of a field's range


@dataclass(frozen=True)
class Range:
    """The values a numeric knob may take: `low`/`high` bounds (None: unbounded), each closed
    unless `*_open`. A list knob's every value must lie in it; null (where allowed) is not checked."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        low, high = self.low, self.high
        if low == high and low is not None:
            return f"{low}"
        if high is None:
            if low == 0:
                return "positive" if self.low_open else "non-negative"
            return f"greater than {low}" if self.low_open else f"at least {low}"
        if low is not None and not (self.low_open or self.high_open):
            return f"between {low} and {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"

    def check(self, value: Any, key: str) -> None:
        """Raise a ConfigError naming `key` if `value` (a number, a list of them, or null) is out of range."""
        values = value if isinstance(value, list) else [value]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if all(v in self for v in numbers):
            return
        every = "every value " if isinstance(value, list) else ""
        raise ConfigError(f"{key}: {every}must be {self}, got {value!r}.")


AT_LEAST_1, NON_NEGATIVE, POSITIVE = Range(1), Range(0), Range(0, low_open=True)
UNIT_OPEN = Range(0, 1, low_open=True, high_open=True)
SEED = Range(0, 2**32 - 1)  # what numpy and Lightning's seeding accept
# The range of a numeric-typed knob that is a choice among values, checked by its section's code.
CHOICE = None


def ranged(
    default: Any = dataclasses.MISSING,
    allowed: Range | None = CHOICE,
    *,
    factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with its range (`allowed`) in its metadata; no `default` nor `factory`:
    the field is required."""
    return dataclasses.field(default=default, default_factory=factory, metadata={RANGE: allowed})


def has_range(f: dataclasses.Field) -> bool:
    """Whether field `f` states its range (`CHOICE` included)."""
    return RANGE in f.metadata


def field_range(cls: type, name: str) -> Range | None:
    """The range of field `name` of dataclass `cls` (None: unranged or a choice)."""
    return next(f.metadata.get(RANGE) for f in dataclasses.fields(cls) if f.name == name)


def mentions_number(hint: Any) -> bool:
    """Whether a type hint admits a number (`int`, `float`, `int | str`, `list[float]`...)."""
    if hint in (int, float):
        return True
    return any(mentions_number(arg) for arg in typing.get_args(hint))


def type_ok(value: Any, hint: Any) -> bool:
    """Whether `value` (as YAML gives it) is of the type `hint`: `bool` is no number, an int is a
    float, `X | None` admits null and `list[X]` checks every item."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def describe(hint: Any) -> str:
    """A type hint as an error message names it (`int or null`)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint)) if typing.get_origin(hint) is None else str(hint)


def reject_unknown(given: Iterable[Any], known: Sequence[str], where: str, what: str = "unknown key") -> None:
    """Raise a ConfigError naming the first key of `given` not in `known` (`where.key`), with the
    closest known key or the list of them."""
    for key in given:
        if key not in known:
            raise ConfigError(f"{where}.{key}: {what}.{did_you_mean(key, known, 'Known keys')}")


def missing_key(key: str, hint: Any) -> ConfigError:
    return ConfigError(f"{key}: missing; it is required ({describe(hint)}).")


def check_value(value: Any, hint: Any, key: str, allowed: Range | None = None) -> None:
    """Raise a ConfigError naming `key` unless `value` is of type `hint` and in range `allowed`."""
    if not type_ok(value, hint):
        raise ConfigError(f"{key}: expected {describe(hint)}, got {type(value).__name__} {value!r}.")
    if allowed is not None:
        allowed.check(value, key)


def required(f: dataclasses.Field) -> bool:
    """Whether field `f` has no default."""
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def build_section(
    cls: type,
    data: Any,
    where: str,
    skip: tuple[str, ...] = (),
    partial: bool = False,
    unknown: str = "unknown key",
) -> dict[str, Any]:
    """The values of mapping `data` for dataclass `cls`, rejecting unknown keys (`unknown`: what
    the error calls one), wrong types and values outside each field's range. `partial`: a part of
    the section (a base's or an experiment's), so required keys may be missing; `skip`: keys set
    elsewhere (the dataset's image size), refused here, or `kind`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    for key in data:
        if key in skip and key != "kind":
            raise ConfigError(f"{where}.{key}: set by the dataset, not here (datasets.<name>.{key}).")
    reject_unknown((key for key in data if key != "kind" or "kind" not in skip), names, where, unknown)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name not in data:
            if not partial and f.name not in skip and required(f):
                raise missing_key(f"{where}.{f.name}", hints[f.name])
            continue
        value = data[f.name]
        if hints[f.name] is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        check_value(value, hints[f.name], f"{where}.{f.name}", f.metadata.get(RANGE))
        values[f.name] = value
    return values

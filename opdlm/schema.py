"""What a config value may be: the type check of plugin options and framework keys (``check_type``),
declared bounds (``Range`` in an option's annotation, ``check_bounds``; every float is finite), and
the did-you-mean of unknown names and keys."""

from __future__ import annotations

import difflib
import inspect
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opdlm.errors import ConfigError


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass(frozen=True)
class Range:
    """The bounds of a numeric option, declared in its annotation so that the config check enforces
    them for every plugin alike, before any weights load::

        def __init__(self, *, top_p: Annotated[float, Range(gt=0, le=1)] = 0.9,
                     max_weight: Annotated[float, Range(gt=0)] | None = None) -> None:

    gt / ge / lt / le: the value must be > / >= / < / <= the bound (None: no bound on that side);
    ``note`` is said with it ("0 = no limit").
    In a list annotation (``list[Annotated[float, Range(ge=0)]]``) it applies to every item. A float
    option is always checked to be finite (no NaN, no ±inf), with or without a Range."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    note: str = ""

    def holds(self, v: float) -> bool:
        """Whether ``v`` lies within the bounds."""
        return ((self.gt is None or v > self.gt) and (self.ge is None or v >= self.ge)
                and (self.lt is None or v < self.lt) and (self.le is None or v <= self.le))

    def text(self) -> str:
        """'in (0, 1]', '> 0', '>= 0 and < 1', ..."""
        lo = (f"({_num(self.gt)}" if self.gt is not None else f"[{_num(self.ge)}") if (self.gt, self.ge) != (None, None) else None
        hi = (f"{_num(self.lt)})" if self.lt is not None else f"{_num(self.le)}]") if (self.lt, self.le) != (None, None) else None
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return f"{'>' if self.gt is not None else '>='} {lo[1:]}"
        if hi:
            return f"{'<' if self.lt is not None else '<='} {hi[:-1]}"
        return "any number"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def nonfinite(value: Any) -> bool:
    """True for a float that is NaN or ±inf (YAML's .nan, .inf, -.inf)."""
    return isinstance(value, float) and not math.isfinite(value)


def check_bounds(value: Any, tp: Any, key: str) -> None:
    """ConfigError for a value that has the right type (check_type) but is not finite or breaks a
    declared Range; lists are checked item by item ("key.2: must be ...")."""
    if typing.get_origin(tp) is typing.Annotated:
        inner, *meta = typing.get_args(tp)
        check_bounds(value, inner, key)
        for rng in meta:
            if isinstance(rng, Range) and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and not rng.holds(value):
                note = f" ({rng.note})" if rng.note else ""
                raise ConfigError(f"{key}: must be {rng.text()}{note}, got {value!r}")
        return
    if nonfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for a in args:  # the first member the value fits
            if check_type(value, a):
                check_bounds(value, a, key)
                return
    elif origin in (list, tuple) and args and isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_bounds(v, args[0], f"{key}.{i}")


def range_of(tp: Any) -> Range | None:
    """The Range declared for a scalar option (through Optional), for listings and docs."""
    if typing.get_origin(tp) is typing.Annotated:
        return next((m for m in typing.get_args(tp)[1:] if isinstance(m, Range)), None)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((r for a in typing.get_args(tp) if (r := range_of(a)) is not None), None)
    return None


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Annotated:
        return type_name(typing.get_args(tp)[0])
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            tp.__name__, tp.__name__
        )
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict or origin is Mapping:
        return "mapping"
    return str(tp)


def check_type(value: Any, tp: Any) -> bool:
    """True if a YAML value fits the annotation ``tp`` (ints are accepted for floats, bools are not
    accepted for numbers)."""
    if tp is Any or tp is inspect.Parameter.empty:
        return True
    if typing.get_origin(tp) is typing.Annotated:
        return check_type(value, typing.get_args(tp)[0])
    if tp is type(None) or tp is None:
        return value is None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(check_type(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if not args:
            return True
        inner = args[0]
        return all(check_type(v, inner) for v in value)
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        return isinstance(value, Mapping)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is bool:
        return isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True

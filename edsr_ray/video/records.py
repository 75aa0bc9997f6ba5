"""Plain-data form of the library's frozen dataclasses, for rows between pipeline stages (Arrow, JSON).

:func:`to_dict` turns a dataclass into JSON-compatible values (fractions as ``"1/12288"``, tuples as lists, nested
dataclasses as dicts); :func:`from_dict` rebuilds it from the field types, so a row round-trips exactly.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from fractions import Fraction
from typing import Any, TypeVar

T = TypeVar("T")


def to_dict(obj: Any) -> dict[str, Any]:
    """The dataclass ``obj`` as a JSON-compatible dict."""
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, Fraction):
        return f"{value.numerator}/{value.denominator}"
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a ``cls`` written by :func:`to_dict` (unknown keys are an error, missing ones take their default)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return cls(**{k: _typed(v, hints[k]) for k, v in data.items()})


def _typed(value: Any, tp: Any) -> Any:
    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _typed(value, inner[0]) if len(inner) == 1 else value
    if tp is Fraction:
        return Fraction(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(v, args[0]) for v in value)
        return tuple(_typed(v, a) for v, a in zip(value, args))
    if origin is dict:
        return {k: _typed(v, args[1]) for k, v in value.items()}
    return value

"""torch's program JSON into its schema dataclasses, as torch's `_dict_to_dataclass` does it,
with each type's conversion worked out once.

torch's version asks `typing.get_type_hints` again for every object it builds: loading a
GPT-2-sized program spent 2.6 s there, most of `nativert.load`. This one builds the same
objects (tests/backend/package compares the two on real programs) from a converter per type,
built on first use and reused.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any

from torch._export.serde import schema
from torch._export.serde.serialize import _resolve_schema_cls
from torch._export.serde.union import _Union, _UnionTag

_CONVERTERS: dict[Any, Callable[[Any], Any]] = {}


def dict_to_dataclass(cls: Any, data: Any) -> Any:
    """What `torch._export.serde.serialize._dict_to_dataclass(cls, data)` returns."""
    return _converter(cls)(data)


def _converter(cls: Any) -> Callable[[Any], Any]:
    try:
        return _CONVERTERS[cls]
    except KeyError:
        pass
    except TypeError:  # unhashable: not a type torch's schema uses; convert it uncached
        return _build(cls)
    convert = _CONVERTERS[cls] = _build(cls)
    return convert


def _build(cls: Any) -> Callable[[Any], Any]:
    cls = _resolve_schema_cls(cls)
    if isinstance(cls, str):
        raise AssertionError(f"Unresolved class type: '{cls}'.")
    origin = typing.get_origin(cls)
    if origin is Annotated:
        return _converter(cls.__origin__)
    if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(cls):
        args = typing.get_args(cls)
        if len(args) != 2:
            raise AssertionError(f"expected 2 type args, got {len(args)}")
        inner = args[0]
        return lambda data: None if data is None else _converter(inner)(data)
    if isinstance(cls, type) and issubclass(cls, _Union):
        hints = typing.get_type_hints(cls, globalns=vars(schema))
        empty = dict.fromkeys(f.name for f in dataclasses.fields(cls))

        def union(data: Any) -> Any:
            if not isinstance(data, dict):
                raise AssertionError(f"expected dict, got {type(data).__name__}")
            if len(data) != 1:
                raise AssertionError(f"expected dict with 1 key, got {len(data)}")
            ((kind, value),) = data.items()
            if not isinstance(kind, str):
                raise AssertionError(f"expected str key, got {type(kind).__name__}")
            # What `cls.create(**{kind: ...})` builds, without its two `dataclasses.fields`
            # calls per object (a third of the conversion's time): every field None but one,
            # and the tag.
            converted = _converter(hints[kind])(value)
            obj = object.__new__(cls)
            obj.__dict__.update(empty)
            obj.__dict__[kind] = converted
            obj._type = _UnionTag.create(kind, cls)
            return obj

        return union
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls, globalns=vars(schema))
        fields = [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]

        def record(data: Any) -> Any:
            # Keys the dataclass does not define are ignored, as torch does (forward
            # compatibility).
            return cls(
                **{name: _converter(hint)(data[name]) for name, hint in fields if name in data}
            )

        return record

    def other(data: Any) -> Any:
        if isinstance(data, list):
            if not data:
                return data
            item = _converter(typing.get_args(cls)[0])
            return [item(d) for d in data]
        if isinstance(data, dict):
            value = _converter(typing.get_args(cls)[1])
            return {k: value(v) for k, v in data.items()}
        if cls is float:
            return float(data)
        return data

    return other

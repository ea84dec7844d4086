"""Checks on what a package's program files say, before torch reads them.

torch's deserializer evaluates parts of `models/*.json`: every symbolic size (`expr_str`)
goes to `sympy.sympify`, which is `eval`, and every node target is resolved by attribute
lookups from `torch`, `operator` and `math` (so `torch.ops.import_module` or `torch.hub.load`
would become graph nodes that run when the program does). Here each of them is checked
against what torch itself writes:

- an expression is sympy's `srepr` of a size: calls of an allowlisted set of sympy and
  torch functions, integers, `Symbol('s0', positive=True, integer=True)`-style symbols, and
  keyword assumptions. Anything else (attributes, strings, operators, names) is refused;
- a target is an OpOverload registered in this process (`torch.ops.ns.op.overload`), a
  higher-order operator (`torch.ops.higher_order.name`), or one of the symbolic-shape
  functions torch serializes by name (`_operator.add`, `torch.sym_max`, `math.trunc`, ...).
  Operator arguments (`as_operator`: the op that `with_effects` runs) are resolved the same
  way (`torch.os.system` would resolve), so they are checked the same way;
- `guards_code` (Python source for torch to `exec`) is dropped.

The file is read as torch's schema says, field by field: names the user chose (an input
called `target`, a weight called `expr_str`) are keys of name-keyed tables, never fields.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Callable
from typing import Any

import torch
from torch._export.serde import schema

# sympy / torch.utils._sympy functions that sympy's srepr writes for shape expressions.
_FUNCTIONS = frozenset(
    {
        "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs",
        "Mod", "floor", "ceiling", "Equality", "Unequality", "GreaterThan",
        "StrictGreaterThan", "LessThan", "StrictLessThan", "And", "Or", "Not",
        "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt",
        "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow",
        "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat",
        "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
    }
)  # fmt: skip
_ATOMS = frozenset({"true", "false", "oo", "zoo", "nan", "int_oo", "True", "False"})
_KEYWORDS = frozenset(
    {
        "integer", "positive", "negative", "nonnegative", "nonpositive", "real", "finite",
        "infinite", "zero", "nonzero", "even", "odd", "rational", "commutative",
        "extended_real", "precision",
    }
)  # fmt: skip
_TOKEN = re.compile(
    r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<int>-?\d+)"
    r"|(?P<str>'[A-Za-z_][A-Za-z0-9_]*'|'-?\d+(?:\.\d+)?(?:e[-+]?\d+)?')|(?P<punct>[(),=]))"
)
_MAX_EXPRESSION = 4096
# Functions whose second argument is an exponent or a shift count (see _check_exponent).
_POWERS = frozenset({"Pow", "PowByNatural", "FloatPow", "LShift", "RShift"})
_MAX_EXPONENT = 64
_MAX_DIGITS = 19  # int64: every size, stride and bound torch writes


class Refused(ValueError):
    """What in a file was refused, and why (the loader adds the file and member)."""


def check_expression(text: Any) -> None:
    """Raise Refused unless `text` is a shape expression as torch writes them."""
    if not isinstance(text, str) or len(text) > _MAX_EXPRESSION:
        raise Refused(f"symbolic expression {str(text)[:80]!r} is not a string of sane size")
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise Refused(f"symbolic expression {text[:80]!r} has characters torch never writes")
        kind = match.lastgroup
        if kind == "int" and len(match.group(kind).lstrip("-")) > _MAX_DIGITS:
            raise Refused(f"symbolic expression {text[:80]!r} has an integer beyond int64")
        tokens.append((kind, match.group(kind)))
        pos = match.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    end = _expression(tokens, 0, text)
    if end != len(tokens):
        raise Refused(f"symbolic expression {text[:80]!r} does not end where it should")


def _expression(tokens: list, i: int, text: str) -> int:
    """Parse one expression from tokens[i]; return the index after it."""
    if i >= len(tokens):
        raise Refused(f"symbolic expression {text[:80]!r} ends early")
    kind, value = tokens[i]
    if kind == "int" or (kind == "name" and value in _ATOMS):
        return i + 1
    if kind != "name" or value not in _FUNCTIONS:
        raise Refused(f"symbolic expression {text[:80]!r} uses {value!r}, which is not allowed")
    function = value
    i = _expect(tokens, i + 1, "(", text)
    first, index = True, 0
    while tokens[i : i + 1] != [("punct", ")")]:
        if not first:
            i = _expect(tokens, i, ",", text)
        start = i
        i = _argument(tokens, i, text, function, first)
        if function in _POWERS and index == 1:
            _check_exponent(tokens[start:i], text)
        first, index = False, index + 1
    return i + 1


def _check_exponent(tokens: list, text: str) -> None:
    """sympy evaluates a power of constants when it builds it: `Pow(Integer(2),
    Integer(10**18))` would take the loading process's memory and time. An exponent (or
    shift) must be a constant of at most 64, or contain a symbol (then nothing is computed)."""
    if any(token == ("name", "Symbol") for token in tokens):
        return
    ints = [int(v) for kind, v in tokens if kind == "int"]
    names = [v for kind, v in tokens if kind == "name"]
    if len(ints) == 1 and set(names) <= {"Integer"} and abs(ints[0]) <= _MAX_EXPONENT:
        return
    raise Refused(
        f"symbolic expression {text[:80]!r} raises to a constant power other than an "
        f"integer of at most {_MAX_EXPONENT}"
    )


def _argument(tokens: list, i: int, text: str, function: str, first: bool) -> int:
    if i >= len(tokens):
        raise Refused(f"symbolic expression {text[:80]!r} ends early")
    if i + 1 < len(tokens) and tokens[i + 1] == ("punct", "="):
        kind, key = tokens[i]
        if kind != "name" or key not in _KEYWORDS:
            raise Refused(f"symbolic expression {text[:80]!r} has keyword {key!r}")
        if i + 2 >= len(tokens) or not (
            tokens[i + 2][0] == "int" or tokens[i + 2][1] in ("True", "False")
        ):
            raise Refused(f"symbolic expression {text[:80]!r}: {key}= takes True, False or int")
        return i + 3
    if tokens[i][0] == "str":
        if not (first and function in ("Symbol", "Float")):
            raise Refused(f"symbolic expression {text[:80]!r} has a string where none belongs")
        return i + 1
    return _expression(tokens, i, text)


def _expect(tokens: list, i: int, punct: str, text: str) -> int:
    if i >= len(tokens) or tokens[i] != ("punct", punct):
        raise Refused(f"symbolic expression {text[:80]!r}: expected {punct!r}")
    return i + 1


@functools.cache
def _symbolic_targets() -> frozenset[str]:
    from torch._export.serde.serialize import _SYM_OPS

    return frozenset(f"{op.__module__}.{op.__name__}" for op in _SYM_OPS)


_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def check_target(target: Any, what: str = "node target") -> None:
    """Raise Refused unless `target` names an operator torch would write (`what` names it
    in the message)."""
    if not isinstance(target, str):
        raise Refused(f"{what} {target!r} is not a string")
    parts = target.split(".")
    if target in _symbolic_targets():
        return
    if parts[:2] != ["torch", "ops"] or not all(_PART.match(p) for p in parts[2:]):
        raise Refused(f"{what} {target!r} is not an operator; refusing to resolve it")
    if any(p.startswith("__") for p in parts):
        raise Refused(f"{what} {target!r} is not an operator")
    if parts[2] == "higher_order" and len(parts) == 4:
        found = getattr(torch.ops.higher_order, parts[3], None)
        if isinstance(found, torch._ops.HigherOrderOperator):
            return
        raise Refused(f"{what} {target!r} is not a higher-order operator of this torch")
    if len(parts) == 5 and parts[2] != "higher_order":
        try:
            packet = getattr(getattr(torch.ops, parts[2]), parts[3])
            found = getattr(packet, parts[4])
        except (AttributeError, RuntimeError):
            found = None
        if isinstance(found, torch._ops.OpOverload):
            return
        raise Refused(
            f"{what} {target!r} is not an operator registered in this process (a custom "
            "op: import the library that defines it before loading)"
        )
    raise Refused(f"{what} {target!r} is not an operator")


# Node metadata torch keeps as plain strings; the rest (source_fn_stack, torch_fn) is
# resolved by attribute lookups on torch, and a program runs without it.
_KEPT_METADATA = ("stack_trace", "nn_module_stack")


@functools.cache
def _fields(cls: type) -> dict[str, Any]:
    """{field: type} of a schema dataclass, forward references resolved."""
    return typing.get_type_hints(cls, globalns=vars(schema))


def check_program_json(data: Any, on_refused: Callable[[str], Exception]) -> None:
    """Check a serialized program (JSON, modified in place) by walking torch's schema for it
    (`torch._export.serde.schema.ExportedProgram`): every node target and operator argument
    is checked, every symbolic expression too, node metadata that torch would resolve by name
    is dropped, and so is the program's `guards_code` (Python source that torch `exec`s when
    `.module()` runs on a program with example inputs; the input ranges and graph asserts
    stay). Only schema fields are read as such: a dict keyed by names (`tensor_values`,
    `range_constraints`, ...) holds the user's names as keys, which may be anything, even
    `target` or `expr_str`. Fields torch does not know are left alone (torch ignores them)."""
    stack: list[tuple[Any, Any]] = [(data, schema.ExportedProgram)]
    try:
        while stack:
            value, kind = stack.pop()
            _check_one(value, kind, stack)
    except Refused as exc:
        raise on_refused(str(exc)) from None


def _check_one(value: Any, kind: Any, stack: list[tuple[Any, Any]]) -> None:
    """Check `value` as the schema type `kind`; push what it contains onto `stack`."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):  # `X | None`: the schema's only unions
        if value is not None:
            stack.append((value, next(a for a in typing.get_args(kind) if a is not type(None))))
        return
    if origin is list:
        if not isinstance(value, list):
            raise Refused(f"expected a list for {kind}, got {type(value).__name__}")
        (item,) = typing.get_args(kind)
        stack.extend((v, item) for v in value)
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise Refused(f"expected an object for {kind}, got {type(value).__name__}")
        item = typing.get_args(kind)[1]
        stack.extend((v, item) for v in value.values())  # keys are names: data, not schema
        return
    if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
        return  # str, int, float, bool, an IntEnum: torch checks these as it reads them
    if not isinstance(value, dict):
        raise Refused(f"expected an object for {kind.__name__}, got {type(value).__name__}")
    fields = _fields(kind)
    if issubclass(kind, schema._Union):
        if len(value) != 1 or next(iter(value)) not in fields:
            raise Refused(f"a {kind.__name__} must hold exactly one of {sorted(fields)}")
        ((field, inner),) = value.items()
        if kind is schema.Argument and field == "as_operator":  # with_effects' op
            check_target(inner, "operator argument")
        stack.append((inner, fields[field]))
        return
    if kind is schema.Node:
        check_target(value.get("target"))
        metadata = value.get("metadata")
        if isinstance(metadata, dict):
            value["metadata"] = {k: metadata[k] for k in _KEPT_METADATA if k in metadata}
    elif kind is schema.SymExpr:
        check_expression(value.get("expr_str"))
    elif kind is schema.ExportedProgram and value.get("guards_code"):
        value["guards_code"] = []
    stack.extend((value[name], t) for name, t in fields.items() if name in value)

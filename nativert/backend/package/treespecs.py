"""The structure of a package's inputs and outputs (pytree specs), read without importing
anything the file names.

torch writes a program's input and output structure as JSON TreeSpecs whose nodes name
Python types (`builtins.tuple`, `transformers.modeling_outputs.BaseModelOutput`, ...).
torch's reader looks each name up in this process's pytree registry, and for two kinds it
imports the module the file names (a defaultdict's factory; an Enum inside a node's
context): code the file chooses. Every spec is checked here before torch reads it:

- by default (`plain_containers=False`) every type must already be registered in this
  process: the caller registers a type by importing the module that defines it before
  loading; the file never does. Anything else is refused with a message that names the
  type and the import to add;
- with `plain_containers=True` every type other than the standard containers (tuple, list,
  dict, OrderedDict, deque) becomes a plain one, whatever was registered when the file was
  saved: a type whose context names one key per child (a registered dataclass, a
  transformers ModelOutput, ...) becomes a dict of those fields, anything else (a
  namedtuple, a type with an opaque context) a tuple of its children, and a defaultdict a
  dict. Leaves are untouched, so the numbers are the same; only the containers change;
- a defaultdict's factory must be a builtin type (list, dict, ...), and an Enum named in a
  context must already be imported (it is then found by plain attribute lookups).
"""

from __future__ import annotations

import json
import keyword
import sys
from enum import Enum
from typing import Any

import torch.utils._pytree as pytree

from nativert.backend.package.untrusted import Refused

_TUPLE, _LIST, _DICT = "builtins.tuple", "builtins.list", "builtins.dict"
_ORDERED_DICT, _DEQUE = "collections.OrderedDict", "collections.deque"
_NAMEDTUPLE, _DEFAULTDICT = "collections.namedtuple", "collections.defaultdict"
STANDARD_CONTAINERS = frozenset({_TUPLE, _LIST, _DICT, _ORDERED_DICT, _DEQUE})
_DICT_LIKE = frozenset({_DICT, _ORDERED_DICT})
_SEQUENCES = frozenset({_TUPLE, _LIST, _DEQUE, _NAMEDTUPLE, "torch.Size"})
_SAFE_FACTORIES = frozenset(
    {"list", "dict", "set", "frozenset", "tuple", "int", "float", "complex", "str", "bytes"}
)
_MAX_DEPTH = 200
_PROTOCOL = 1  # the TreeSpec JSON protocol torch 2.13 writes and reads
_ORIGIN = {"in_spec": "inputs", "out_spec": "outputs"}


def call_signatures(data: Any) -> list[tuple[Any, dict]]:
    """(fqn, signature) for each entry of a serialized program's module call graph that has
    a signature; anything not shaped as torch writes it is left to torch's schema check."""
    graph_module = data.get("graph_module") if isinstance(data, dict) else None
    entries = graph_module.get("module_call_graph") if isinstance(graph_module, dict) else None
    found = []
    for entry in entries if isinstance(entries, list) else []:
        signature = entry.get("signature") if isinstance(entry, dict) else None
        if isinstance(signature, dict):
            found.append((entry.get("fqn"), signature))
    return found


def check_call_graph(data: Any, *, plain_containers: bool) -> None:
    """Check every TreeSpec of a serialized program (JSON; each replaced in place by the spec
    torch should read): the input and output specs of its module call graph."""
    for _, signature in call_signatures(data):
        for key, what in _ORIGIN.items():
            if key in signature:
                signature[key] = check_treespec(
                    signature[key], plain_containers=plain_containers, what=what
                )


def check_treespec(serialized: Any, *, plain_containers: bool, what: str = "outputs") -> str:
    """The serialized TreeSpec torch should read instead of `serialized`; raises Refused
    (naming the type, and what to do) for one that would need an import or an unregistered
    type. `what` ("inputs" or "outputs") is for the message."""
    spec = _parse(serialized)
    checked = _node(spec, plain_containers, what, 0)
    return json.dumps([_PROTOCOL, checked])


def leaf_paths(serialized: str) -> list[str] | None:
    """Each leaf's path in a serialized TreeSpec, in flattening order, as the saving process
    saw its types: `logits` and `.logits` for a field, `['logits']` for a dict key, `[0]` for
    a position; `output` for a spec that is a single leaf. Needs no type to be registered;
    None for a spec that cannot be read."""
    try:
        spec = _parse(serialized)
        paths: list[str] = []
        _paths(spec, "", paths, 0)
    except Refused:
        return None
    return [p.removeprefix(".") or "output" for p in paths]


def spec_type(serialized: str) -> str | None:
    """The type name at the root of a serialized TreeSpec (None for a leaf or a bad spec)."""
    try:
        kind, context, _ = _shape(_parse(serialized), 0)
    except Refused:
        return None
    return context if kind == _NAMEDTUPLE and isinstance(context, str) else kind


def _parse(serialized: Any) -> dict:
    if not isinstance(serialized, str):
        raise Refused("a pytree spec is not a string")
    try:
        protocol, spec = json.loads(serialized)
    except (ValueError, TypeError, RecursionError) as exc:
        raise Refused(f"a pytree spec is not the JSON torch writes: {exc}") from None
    if protocol != _PROTOCOL:
        raise Refused(f"pytree spec protocol {protocol!r}; this torch reads {_PROTOCOL}")
    return spec


def _shape(spec: Any, depth: int) -> tuple[Any, Any, list]:
    if depth > _MAX_DEPTH:
        raise Refused(f"a pytree spec nests deeper than {_MAX_DEPTH} levels")
    if not isinstance(spec, dict) or set(spec) != {"type", "context", "children_spec"}:
        raise Refused("a pytree spec node is not the JSON torch writes")
    kind, children = spec["type"], spec["children_spec"]
    if not isinstance(children, list) or not (kind is None or isinstance(kind, str)):
        raise Refused("a pytree spec node is not the JSON torch writes")
    if kind is None and (spec["context"] is not None or children):
        raise Refused("a pytree leaf has a context or children")
    return kind, spec["context"], children


def _node(spec: Any, plain: bool, what: str, depth: int) -> dict:
    kind, context, children = _shape(spec, depth)
    if kind is None:
        return spec
    children = [_node(child, plain, what, depth + 1) for child in children]
    if kind in STANDARD_CONTAINERS:
        keys = _context_json(context, kind)
        if kind in _DICT_LIKE and (not isinstance(keys, list) or len(keys) != len(children)):
            raise Refused(f"a {kind} pytree node has {len(children)} children but not as many keys")
        return _spec(kind, context, children)
    if kind == _NAMEDTUPLE:
        if plain:
            return _spec(_TUPLE, "null", children)
        if not isinstance(context, str):
            raise Refused("a namedtuple pytree node does not name its type")
        _registered(context, what)
        return _spec(kind, context, children)
    if kind == _DEFAULTDICT:
        return _defaultdict(context, children, plain)
    if plain:
        return _plain(context, children)
    _registered(kind, what)
    registration = pytree.SUPPORTED_SERIALIZED_TYPES[pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE[kind]]
    if registration.from_dumpable_context is None:
        _context_json(context, kind)  # torch json-loads it, resolving Enums by import
    return _spec(kind, context, children)


def _spec(kind: str | None, context: Any, children: list) -> dict:
    return {"type": kind, "context": context, "children_spec": children}


def _registered(name: str, what: str) -> None:
    if name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
        return
    module = name.rpartition(".")[0]
    add = f"`import {module}` (the module that defines it)" if module else "its registration"
    raise Refused(
        f"its {what} use the pytree type {name!r}, which is not registered in this process. "
        f"nativert never imports a module because a file names it: add {add} before "
        "nativert.load, or pass nativert.load(path, plain_containers=True) to get its "
        "fields as a plain dict"
    )


def _context_json(context: Any, kind: str) -> Any:
    """A context torch json-loads: parsed here first, with every Enum it names checked."""
    if not isinstance(context, str):
        raise Refused(f"the context of a {kind} pytree node is not a JSON string")
    try:
        return json.loads(context, object_hook=_imported_enum)
    except Refused:
        raise
    except (ValueError, RecursionError) as exc:
        raise Refused(f"the context of a {kind} pytree node is not JSON: {exc}") from None


def _imported_enum(obj: dict) -> dict:
    """torch resolves {"__enum__": ..., "fqn": "module:Class"} by importing the module: allow
    it only when the module is imported already and the Enum is found without running code."""
    if "__enum__" not in obj:
        return obj
    fqn, name = obj.get("fqn"), obj.get("name")
    found: Any = None
    if isinstance(fqn, str) and ":" in fqn:
        module, _, qualname = fqn.partition(":")
        found = sys.modules.get(module)
        for part in qualname.split("."):
            try:  # the namespace itself, not getattr: a module's __getattr__ may import
                found = vars(found).get(part)
            except TypeError:
                found = None
    if isinstance(found, type) and issubclass(found, Enum) and name in found.__members__:
        return obj
    raise Refused(
        f"a pytree spec names the Enum {fqn!r}, which is not imported in this process; "
        "nativert never imports a module because a file names it: import it before "
        "nativert.load"
    )


def _defaultdict(context: Any, children: list, plain: bool) -> dict:
    if not isinstance(context, dict) or set(context) != {
        "default_factory_module",
        "default_factory_name",
        "dict_context",
    }:
        raise Refused("a defaultdict pytree node is not the JSON torch writes")
    keys = context["dict_context"]
    if not _is_keys(keys, len(children)):
        raise Refused(
            f"a defaultdict pytree node has {len(children)} children but not as many keys"
        )
    if plain:
        return _spec(_DICT, json.dumps(keys), children)
    factory = (context["default_factory_module"], context["default_factory_name"])
    if factory[0] != "builtins" or factory[1] not in _SAFE_FACTORIES:
        raise Refused(
            f"a defaultdict in its pytree spec has the factory {'.'.join(map(str, factory))!r}; "
            "nativert rebuilds only builtin factories (list, dict, int, ...) and never imports "
            "a module because a file names it. Pass nativert.load(path, plain_containers=True) "
            "to get a plain dict"
        )
    return _spec(_DEFAULTDICT, context, children)


def _plain(context: Any, children: list) -> dict:
    keys = _field_names(context, len(children))
    if keys is None:
        return _spec(_TUPLE, "null", children)
    return _spec(_DICT, json.dumps(keys), children)


def _field_names(context: Any, n: int) -> list | None:
    """One key per child, from a context as torch writes it: a list of keys (transformers'
    ModelOutput, dicts), or [present fields, None fields] (`register_dataclass`); None when
    the context names no keys."""
    if isinstance(context, str):
        try:
            context = json.loads(context)
        except (ValueError, RecursionError):
            return None
    if _is_keys(context, n):
        return context
    if (
        isinstance(context, list)
        and len(context) == 2
        and _is_keys(context[0], n)
        and isinstance(context[1], list)
        and all(isinstance(k, str) for k in context[1])
    ):
        return context[0]
    return None


def _is_keys(value: Any, n: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == n
        and all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in value)
        and len(set(value)) == n
    )


def _paths(spec: Any, prefix: str, out: list[str], depth: int) -> None:
    kind, context, children = _shape(spec, depth)
    if kind is None:
        out.append(prefix)
        return
    keys: list | None = None
    attributes = False
    if kind in _DICT_LIKE:
        keys = _field_names(context, len(children))
    elif kind == _DEFAULTDICT and isinstance(context, dict):
        keys = _field_names(context.get("dict_context"), len(children))
    elif kind not in _SEQUENCES:
        keys = _field_names(context, len(children))
        attributes = True
    for i, child in enumerate(children):
        if keys is None:
            step = f"[{i}]"
        elif attributes and _is_attribute(keys[i]):
            step = f".{keys[i]}"
        else:
            step = f"[{keys[i]!r}]"
        _paths(child, prefix + step, out, depth + 1)


def _is_attribute(key: Any) -> bool:
    return isinstance(key, str) and key.isidentifier() and not keyword.iskeyword(key)

"""Input checks done before running, with errors that name the input by the name the user
knows (the forward argument, `inputs['mask']`, `pair[1]`; for a segment, its placeholder).

The Executor checks a program's inputs; a lowered module checks its segment's inputs when
called through `call_delegate` (`.module()`), so a wrong rank, dtype or size never reaches a
runtime as that runtime's own error."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from nativert.errors import DelegateCallError


def _user_names(program: ExportedProgram, count: int) -> list[str]:
    """`x`, `inputs['mask']`, `pair[1]`: each flat input by the path a user wrote."""
    spec = program.call_spec.in_spec
    signature = program.module_call_graph[0].signature
    arg_names = list(getattr(signature, "forward_arg_names", None) or [])
    leaves = pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(count)), spec))[0]
    names = []
    for path, _ in leaves:
        if len(path) >= 2 and path[0] == pytree.SequenceKey(0):
            i = path[1].idx
            head = arg_names[i] if i < len(arg_names) else f"args[{i}]"
            names.append(head + pytree.keystr(path[2:]))
        elif len(path) >= 2 and path[0] == pytree.SequenceKey(1):
            names.append(str(path[1].key) + pytree.keystr(path[2:]))
        else:
            names.append(pytree.keystr(path))
    return names


def user_inputs(program: ExportedProgram) -> list[tuple[str, Any]]:
    """The program's user inputs, in placeholder order: each by the name a user passes it by
    (`input`, not the placeholder `input_1`: what errors, `nativert inspect` and the serving
    API all call it), with its placeholder's example value (a FakeTensor, or a constant)."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    specs = [s for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    names = _user_names(program, len(specs))
    values = [placeholders[s.arg.name].meta.get("val") for s in specs]
    return list(zip(names, values, strict=True))


class InputSpecs:
    """What each user input must be: count, dtype, rank, static dims, dynamic dim ranges,
    device. Built once from the program's placeholders and range constraints."""

    def __init__(self, program: ExportedProgram, *, owner: str | None = None) -> None:
        """`owner` (e.g. "segment 'onnxruntime_0'") prefixes every error; inputs are then
        named by their placeholders, not by the user's argument names."""
        specs = [s for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
        named = user_inputs(program)
        self.values = [value for _, value in named]
        self.owner = owner
        self.names = [s.arg.name for s in specs] if owner is not None else [n for n, _ in named]
        self._seen: set[tuple] = set()  # signatures `validate` has checked already
        self.in_spec = program.call_spec.in_spec
        self.ranges = dict(program.range_constraints)
        # Dims that are expressions of other dims (y has b + 1 rows): compiled once.
        import sympy

        self._derived = {}
        for v in self.values:
            if isinstance(v, torch.Tensor):
                for d in v.shape:
                    expr = d.node.expr if isinstance(d, torch.SymInt) else None
                    if expr is not None and not expr.is_Symbol and expr not in self._derived:
                        symbols = sorted(expr.free_symbols, key=str)
                        self._derived[expr] = (symbols, sympy.lambdify(symbols, expr))
        # Fast path per input: (dtype, fully static shape or None, on CPU); anything that
        # does not match it exactly gets the detailed check and its error.
        self._fast = [
            (
                v.dtype,
                tuple(v.shape) if all(isinstance(d, int) for d in v.shape) else None,
                v.device.type == "cpu",
            )
            if isinstance(v, torch.Tensor)
            else None
            for v in self.values
        ]
        simple = pytree.tree_flatten((tuple(range(len(specs))), {}))[1]
        self._positional = self.in_spec == simple
        # The hot path: positional tensors of fully static shapes, checked in one loop.
        self._static = (
            tuple(self._fast)
            if self._positional and all(f is not None and f[1] is not None for f in self._fast)
            else None
        )
        signature = program.module_call_graph[0].signature
        self._arg_names = list(getattr(signature, "forward_arg_names", None) or [])

    def _normalize(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Keyword arguments in any order, and for positional parameters, as
        program.module() accepts them: reorder them to the exported structure."""
        keys = list(self.in_spec.child(1).context or [])
        positional = [n for n in self._arg_names[len(args) :] if n in kwargs and n not in keys]
        args = (*args, *(kwargs[n] for n in positional))
        rest = {k: v for k, v in kwargs.items() if k not in positional}
        ordered = {k: rest[k] for k in keys if k in rest}
        ordered.update({k: v for k, v in rest.items() if k not in ordered})
        return args, ordered

    def flatten(self, args: tuple, kwargs: dict) -> Sequence[Any]:
        """The flat inputs in placeholder order, checked (cheaply when they match what was
        exported exactly; otherwise by `check`, which names what does not fit)."""
        static = self._static
        if static is not None and not kwargs and len(args) == len(static):
            for value, (dtype, shape, cpu) in zip(args, static, strict=True):
                if not (
                    isinstance(value, torch.Tensor)
                    and value.dtype is dtype
                    and value.shape == shape
                    and value.is_cpu is cpu
                ):
                    self.check(list(args))  # something is wrong: say what
                    break
            return args
        if self._positional and not kwargs and len(args) == len(self.values):
            flat = list(args)
        else:
            flat, spec = pytree.tree_flatten((args, kwargs))
            if spec != self.in_spec and kwargs:
                flat, spec = pytree.tree_flatten(self._normalize(args, kwargs))
            if spec != self.in_spec:
                if len(flat) != len(self.values):
                    raise DelegateCallError(
                        f"expected {len(self.values)} inputs ({', '.join(self.names)}), "
                        f"got {len(flat)}"
                    )
                raise DelegateCallError(
                    f"inputs ({', '.join(self.names)}) must be structured as {self.in_spec}, "
                    f"got {spec}"
                )
        for value, fast, want in zip(flat, self._fast, self.values, strict=True):
            if fast is None:
                if isinstance(want, (int, float, bool)) and value != want:
                    self.check(flat)  # a constant input with another value: say which
                continue
            dtype, shape, cpu = fast
            if not (
                isinstance(value, torch.Tensor)
                and value.dtype is dtype
                and shape is not None
                and value.shape == shape
                and value.is_cpu is cpu
            ):
                self.check(flat)  # dynamic dims, or something is wrong: say what
                break
        return flat

    def validate(self, flat: Sequence[Any]) -> None:
        """`check`, once per input signature (dtypes, shapes, devices, constant values)."""
        key = tuple(
            (v.dtype, v.shape, v.device.type) if isinstance(v, torch.Tensor) else v for v in flat
        )
        try:
            seen = key in self._seen
        except TypeError:  # an unhashable input (a numpy array, a list): check says what
            self.check(list(flat))
            return
        if seen:
            return
        self.check(list(flat))
        if len(self._seen) < 256:
            self._seen.add(key)

    def check(self, flat: list[Any]) -> None:
        """Raise DelegateCallError naming the first input that does not fit."""
        if len(flat) != len(self.values):
            names = ", ".join(self.names)
            self._fail(f"expected {len(self.values)} inputs ({names}), got {len(flat)}")
        try:
            self._check(flat)
        except DelegateCallError as exc:
            if self.owner is None:
                raise
            raise DelegateCallError(f"{self.owner}: {exc}") from None

    def _fail(self, message: str) -> None:
        raise DelegateCallError(f"{self.owner}: {message}" if self.owner else message)

    def _check(self, flat: list[Any]) -> None:
        seen: dict[Any, tuple[int, str]] = {}
        derived: list[tuple[str, int, int, Any]] = []
        for value, want, name in zip(flat, self.values, self.names, strict=True):
            if not isinstance(want, torch.Tensor):
                if isinstance(want, (int, float, bool)) and value != want:
                    raise DelegateCallError(
                        f"input {name!r} was exported as the constant {want!r} and the program "
                        f"is specialised to it; got {value!r}. Export with a dynamic value "
                        "(torch.export.Dim) or re-export for this value"
                    )
                continue
            if not isinstance(value, torch.Tensor):
                raise DelegateCallError(
                    f"input {name!r} must be a Tensor, got {type(value).__name__}"
                )
            if value.dtype != want.dtype:
                raise DelegateCallError(
                    f"input {name!r} has dtype {value.dtype}, expected {want.dtype}"
                )
            if value.dim() != want.dim():
                raise DelegateCallError(
                    f"input {name!r} has rank {value.dim()} (shape {tuple(value.shape)}), "
                    f"expected rank {want.dim()}"
                )
            if value.device.type != want.device.type:
                raise DelegateCallError(
                    f"input {name!r} is on {value.device}, expected {want.device.type}"
                )
            for axis, (got, dim) in enumerate(zip(value.shape, want.shape, strict=True)):
                if not isinstance(dim, torch.SymInt):
                    if got != dim:
                        raise DelegateCallError(
                            f"input {name!r} has size {got} in dimension {axis}, expected "
                            f"{dim} (shape {tuple(value.shape)})"
                        )
                    continue
                expr = dim.node.expr
                if expr in self._derived:
                    derived.append((name, axis, got, expr))
                    continue
                bounds = self.ranges.get(expr)
                if bounds is not None and not (bounds.lower <= got <= bounds.upper):
                    raise DelegateCallError(
                        f"input {name!r} has size {got} in dimension {axis}, outside the "
                        f"exported range [{bounds.lower}, {bounds.upper}] for {expr}"
                    )
                if expr in seen and seen[expr][0] != got:
                    raise DelegateCallError(
                        f"input {name!r} has size {got} in dimension {axis}, but "
                        f"{seen[expr][1]} fixed {expr} = {seen[expr][0]}"
                    )
                seen.setdefault(expr, (got, f"{name!r} dimension {axis}"))
        for name, axis, got, expr in derived:
            symbols, fn = self._derived[expr]
            if all(sym in seen for sym in symbols):
                want = int(fn(*(seen[sym][0] for sym in symbols)))
                if got != want:
                    raise DelegateCallError(
                        f"input {name!r} has size {got} in dimension {axis}, expected {expr} = "
                        f"{want} from the other inputs' sizes"
                    )

"""Small helpers over ExportedProgram signatures and tensors, shared by lowering and runtime."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.exported_program import ModuleCallEntry, ModuleCallSignature
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputKind,
    OutputSpec,
    SymIntArgument,
    TensorArgument,
)
from torch.fx import GraphModule, Node
from torch.multiprocessing.reductions import StorageWeakRef

from nativert.errors import LoweringError, WeightsError

WEIGHT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
ARG_NAME_KEY = "nativert_signature_name"


def weight_names(program: ExportedProgram) -> tuple[str, ...]:
    """Targets of the program's lifted weights, in placeholder order (they come first)."""
    names = []
    for spec in program.graph_signature.input_specs:
        if spec.kind in WEIGHT_KINDS:
            names.append(spec.target)
        elif spec.kind != InputKind.USER_INPUT:
            raise LoweringError(
                f"input {spec.arg.name!r} is of kind {spec.kind.name}, which nativert cannot "
                "lower yet (custom objects and effect tokens are not supported)"
            )
    return tuple(names)


def weight_tensor(program: ExportedProgram, target: str) -> torch.Tensor:
    """The tensor a lifted weight target refers to (state_dict or constants)."""
    if target in program.state_dict:
        return program.state_dict[target]
    if target in program.constants:
        return program.constants[target]
    raise LoweringError(f"weight {target!r} is in the signature but not in the program")


def placeholder_values(program: ExportedProgram) -> list[Any]:
    """meta['val'] of every placeholder, in order (fake tensors or SymInts)."""
    return [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"]


def validate_weights(
    expected: Mapping[str, Any],
    given: Mapping[str, torch.Tensor],
    *,
    owner: str,
) -> None:
    """Check names, dtypes and static shapes of `given` against `expected` fake values."""
    missing = [name for name in expected if name not in given]
    unexpected = [name for name in given if name not in expected]
    if missing or unexpected:
        raise WeightsError(
            f"{owner}: weights do not match: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}; pass exactly {sorted(expected)}"
        )
    for name, want in expected.items():
        got = given[name]
        if not isinstance(got, torch.Tensor):
            raise WeightsError(
                f"{owner}: weight {name!r} must be a Tensor, got {type(got).__name__}"
            )
        if got.dtype != want.dtype:
            raise WeightsError(
                f"{owner}: weight {name!r} has dtype {got.dtype}, expected {want.dtype}"
            )
        if got.device.type != want.device.type:
            raise WeightsError(
                f"{owner}: weight {name!r} is on {got.device}, expected {want.device.type}"
            )
        if tuple(got.shape) != tuple(want.shape):
            raise WeightsError(
                f"{owner}: weight {name!r} has shape {tuple(got.shape)}, "
                f"expected {tuple(want.shape)}"
            )


def _storage_key(t: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(t.untyped_storage())


def unalias_outputs(outputs: Iterable[Any], inputs: Sequence[Any]) -> tuple[Any, ...]:
    """Clone outputs that share storage with an input or an earlier output.

    Callers of call_delegate may rely on outputs being fresh tensors (torch's tracing does),
    while a graph run in PyTorch may return an input, a view of it, or one tensor twice.
    """
    seen = {_storage_key(t) for t in inputs if isinstance(t, torch.Tensor)}
    fresh = []
    for out in outputs:
        if isinstance(out, torch.Tensor):
            key = _storage_key(out)
            if key in seen:
                out = out.clone()
                key = _storage_key(out)
            seen.add(key)
        fresh.append(out)
    return tuple(fresh)


class _NotDifferentiable(Exception):
    def __init__(self, node: Node, argument: str) -> None:
        self.node, self.argument = node, argument


class _GradProbe(torch.fx.Interpreter):
    """Runs a graph, detaching the (node, argument) pairs torch says take no gradient."""

    def __init__(self, gm: GraphModule, detach: set[tuple[Node, str]]) -> None:
        super().__init__(gm)
        self.detach = detach

    def run_node(self, n: Node) -> Any:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        names = [a.name for a in n.target._schema.arguments]
        args = tuple(
            a.detach() if (n, names[i]) in self.detach and isinstance(a, torch.Tensor) else a
            for i, a in enumerate(args)
        )
        try:
            return n.target(*args, **kwargs)
        except RuntimeError as exc:
            found = re.search(r"not differentiable with respect to argument '(\w+)'", str(exc))
            if found is None:
                raise
            raise _NotDifferentiable(n, found.group(1)) from exc


def find_nondifferentiable_outputs(
    program: ExportedProgram, no_grad_inputs: Iterable[int] = ()
) -> frozenset[int]:
    """Indices of outputs that carry no gradient even when every float input requires grad.

    Runs the graph once on the placeholders' fake values, with every float input requiring
    grad except `no_grad_inputs` (state the caller mutates, like running stats). Where torch
    says an op takes no gradient for an argument (batch norm's running stats), that argument
    is detached for that op and the probe runs again. Without fake values, only non-float
    outputs are reported.
    """
    values = placeholder_values(program)
    outputs = program.graph.output_node().args[0]
    fallback = frozenset(
        i
        for i, out in enumerate(outputs)
        if not (isinstance(out, torch.fx.Node) and _is_float(out.meta.get("val")))
    )
    fake_mode = detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
    if fake_mode is None or any(v is None for v in values):
        return fallback
    skip = set(no_grad_inputs)
    detach: set[tuple[Node, str]] = set()
    while True:
        with fake_mode, torch.enable_grad():
            args = [
                v.detach().requires_grad_(i not in skip)
                if isinstance(v, torch.Tensor) and _is_float(v)
                else v
                for i, v in enumerate(values)
            ]
            try:
                results = _GradProbe(program.graph_module, detach).run(*args)
                break
            except _NotDifferentiable as exc:
                if (exc.node, exc.argument) in detach:
                    raise
                detach.add((exc.node, exc.argument))
    return frozenset(
        i
        for i, out in enumerate(results)
        if not (isinstance(out, torch.Tensor) and out.requires_grad)
    )


def finite_int(bound: Any) -> int | None:
    """A range bound as an int; None for an unbounded one (int_oo and friends)."""
    try:
        return int(bound)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def _is_float(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())


def argument(node: Node) -> TensorArgument | SymIntArgument:
    """The signature argument for a graph node (SymInt placeholders are SymIntArguments)."""
    if isinstance(node.meta.get("val"), torch.SymInt):
        return SymIntArgument(name=node.name)
    return TensorArgument(name=node.name)


def program_from_graph(
    gm: GraphModule,
    weights: Sequence[InputSpec],
    tensors: Mapping[str, torch.Tensor],
    *,
    range_constraints: Mapping[Any, Any],
    verifiers: Any,
) -> ExportedProgram:
    """An ExportedProgram over `gm` (used as is) whose first len(weights) placeholders are
    those weights (kind, target, persistent from `weights`, tensors from `tensors` by target)
    and the rest user inputs; every output is a user output."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    user = placeholders[len(weights) :]
    input_specs, state_dict, constants = [], {}, {}
    for spec, node in zip(weights, placeholders, strict=False):
        input_specs.append(
            InputSpec(spec.kind, TensorArgument(name=node.name), spec.target, spec.persistent)
        )
        persistent = spec.kind == InputKind.PARAMETER or (
            spec.kind == InputKind.BUFFER and spec.persistent
        )
        (state_dict if persistent else constants)[spec.target] = tensors[spec.target]
    input_specs += [InputSpec(InputKind.USER_INPUT, argument(n), None) for n in user]
    outputs = list(gm.graph.output_node().args[0])
    signature = ModuleCallSignature(
        inputs=[argument(n) for n in user],
        outputs=[argument(n) for n in outputs],
        in_spec=pytree.tree_flatten((tuple(n.meta.get("val") for n in user), {}))[1],
        out_spec=pytree.tree_flatten(tuple(n.meta.get("val") for n in outputs))[1],
    )
    return ExportedProgram(
        root=gm,
        graph=gm.graph,
        graph_signature=ExportGraphSignature(
            input_specs, [OutputSpec(OutputKind.USER_OUTPUT, argument(n), None) for n in outputs]
        ),
        state_dict=state_dict,
        range_constraints=dict(range_constraints),
        module_call_graph=[ModuleCallEntry("", signature)],
        constants=constants,
        verifiers=verifiers,
    )


def rebuild_program(
    program: ExportedProgram,
    gm: GraphModule,
    *,
    new_inputs: Mapping[str, InputSpec] | None = None,
    new_weights: Mapping[str, torch.Tensor] | None = None,
) -> ExportedProgram:
    """A new ExportedProgram over `gm`, a rewritten copy of `program`'s graph.

    Input specs follow gm's placeholders, found by the signature name each placeholder had in
    `program` (copies may rename a placeholder, e.g. one called `input`; see
    `copy_graph_module`) or in `new_inputs`. Output specs are re-bound by position to gm's
    output node, so passes may replace output nodes. Weights no placeholder refers to any
    more are dropped; `new_weights` are added.
    """
    new_inputs = dict(new_inputs or {})
    old_inputs = {spec.arg.name: spec for spec in program.graph_signature.input_specs}
    renamed_inputs: dict[str, str] = {}
    input_specs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.name in new_inputs:
            input_specs.append(new_inputs[node.name])
            continue
        spec = old_inputs[node.meta.get(ARG_NAME_KEY, node.name)]
        if spec.arg.name != node.name:
            renamed_inputs[spec.arg.name] = node.name
            spec = InputSpec(
                spec.kind, type(spec.arg)(name=node.name), spec.target, spec.persistent
            )
        input_specs.append(spec)
    remember_input_names(gm)  # the new signature uses the current names
    targets = {spec.target for spec in input_specs if spec.kind in WEIGHT_KINDS}
    weights = {**program.state_dict, **program.constants, **(new_weights or {})}
    state_dict, constants = {}, {}
    for spec in input_specs:
        if spec.kind not in WEIGHT_KINDS:
            continue
        persistent = spec.kind == InputKind.PARAMETER or (
            spec.kind == InputKind.BUFFER and spec.persistent
        )
        if spec.target in program.constants and spec.target not in program.state_dict:
            persistent = False
        (state_dict if persistent else constants)[spec.target] = weights[spec.target]
    # Non-tensor constants (script objects) stay as they were.
    constants.update(
        {
            k: v
            for k, v in program.constants.items()
            if k not in targets and not isinstance(v, torch.Tensor)
        }
    )

    output_args = gm.graph.output_node().args[0]
    sig = program.graph_signature
    renamed, output_specs = {}, []
    for spec, arg in zip(sig.output_specs, output_args, strict=True):
        target = renamed_inputs.get(spec.target, spec.target)  # user-input mutations
        if isinstance(spec.arg, (TensorArgument, SymIntArgument)) and isinstance(arg, Node):
            renamed[spec.arg.name] = arg.name
            spec = OutputSpec(spec.kind, type(spec.arg)(name=arg.name), target)
        output_specs.append(spec)

    call_graph = []
    for entry in program.module_call_graph:
        signature = entry.signature
        if signature is not None and entry.fqn == "":
            outputs = [
                type(a)(name=renamed.get(a.name, a.name))
                if isinstance(a, (TensorArgument, SymIntArgument))
                else a
                for a in signature.outputs
            ]
            inputs = [
                type(a)(name=renamed_inputs.get(a.name, a.name))
                if isinstance(a, (TensorArgument, SymIntArgument))
                else a
                for a in signature.inputs
            ]
            signature = ModuleCallSignature(
                inputs=inputs,
                outputs=outputs,
                in_spec=signature.in_spec,
                out_spec=signature.out_spec,
                forward_arg_names=signature.forward_arg_names,
            )
        call_graph.append(ModuleCallEntry(entry.fqn, signature))

    return ExportedProgram(
        root=gm,
        graph=gm.graph,
        graph_signature=ExportGraphSignature(input_specs, output_specs),
        state_dict=state_dict,
        range_constraints=program.range_constraints,
        module_call_graph=call_graph,
        example_inputs=program.example_inputs,
        constants=constants,
        verifiers=program.verifiers,
    )


def remember_input_names(gm: GraphModule, names: Iterable[str] | None = None) -> None:
    """Record on each placeholder the signature name it answers to.

    Graph copies (deepcopy, stable_topological_sort) may rename placeholders; meta travels
    with the copies, so rebuild_program can still find each placeholder's spec.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = [n.name for n in placeholders] if names is None else list(names)
    for node, name in zip(placeholders, names, strict=True):
        node.meta[ARG_NAME_KEY] = name


def copy_graph_module(program: ExportedProgram) -> GraphModule:
    """A copy of the program's graph module that a pass may rewrite freely.

    Graph and attributes are copied; lowered modules share their runtime (their
    __deepcopy__). Placeholders remember their signature names (see remember_input_names).
    """
    import copy

    original = [
        n.meta.get(ARG_NAME_KEY, n.name) for n in program.graph.nodes if n.op == "placeholder"
    ]
    gm = copy.deepcopy(program.graph_module)
    remember_input_names(gm, original)
    return gm

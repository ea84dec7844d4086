"""Building ExportedPrograms over rewritten graphs, with their signatures re-bound."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
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

from nativert._program.meta import ARG_NAME_KEY
from nativert._program.signature import WEIGHT_KINDS, argument


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
    # Root inputs and outputs left empty, as torch.export leaves them: named, they go stale
    # when a later run_decompositions replaces an output node (var_mean's getitems), and the
    # verifier then rejects the program ("Output getitem does not exist in the graph").
    signature = ModuleCallSignature(
        inputs=[],
        outputs=[],
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
    input_specs, renamed_inputs = _input_specs(program, gm, dict(new_inputs or {}))
    remember_input_names(gm)  # the new signature uses the current names
    state_dict, constants = _weights(program, input_specs, new_weights or {})
    output_specs, renamed_outputs = _output_specs(program, gm, renamed_inputs)
    rebuilt = ExportedProgram(
        root=gm,
        graph=gm.graph,
        graph_signature=ExportGraphSignature(input_specs, output_specs),
        state_dict=state_dict,
        range_constraints=program.range_constraints,
        module_call_graph=_call_graph(program, renamed_inputs, renamed_outputs),
        example_inputs=program.example_inputs,
        constants=constants,
        verifiers=program.verifiers,
    )
    # A rewrite keeps the program's input contract. ExportedProgram reads its input guards
    # off the fake tensors' shared ShapeEnv, where compiling a segment (tracing it again)
    # may have added guards of its own (e.g. `batch < 16`): `.module()` would then reject
    # valid inputs. Keep the guards the program had.
    rebuilt._guards_code = list(program._guards_code)
    return rebuilt


def _input_specs(
    program: ExportedProgram, gm: GraphModule, new_inputs: dict[str, InputSpec]
) -> tuple[list[InputSpec], dict[str, str]]:
    """gm's input specs, and old name -> new name for placeholders a copy renamed."""
    old_inputs = {spec.arg.name: spec for spec in program.graph_signature.input_specs}
    renamed: dict[str, str] = {}
    specs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.name in new_inputs:
            specs.append(new_inputs[node.name])
            continue
        spec = old_inputs[node.meta.get(ARG_NAME_KEY, node.name)]
        if spec.arg.name != node.name:
            renamed[spec.arg.name] = node.name
            spec = InputSpec(
                spec.kind, type(spec.arg)(name=node.name), spec.target, spec.persistent
            )
        specs.append(spec)
    return specs, renamed


def _weights(
    program: ExportedProgram,
    input_specs: Sequence[InputSpec],
    new_weights: Mapping[str, torch.Tensor],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state_dict, constants) for the weights the new signature refers to."""
    targets = {spec.target for spec in input_specs if spec.kind in WEIGHT_KINDS}
    weights = {**program.state_dict, **program.constants, **new_weights}
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
    return state_dict, constants


def _output_specs(
    program: ExportedProgram, gm: GraphModule, renamed_inputs: Mapping[str, str]
) -> tuple[list[OutputSpec], dict[str, str]]:
    """Output specs re-bound by position to gm's outputs, and old name -> new name."""
    output_args = gm.graph.output_node().args[0]
    renamed, specs = {}, []
    for spec, arg in zip(program.graph_signature.output_specs, output_args, strict=True):
        target = renamed_inputs.get(spec.target, spec.target)  # user-input mutations
        if isinstance(spec.arg, (TensorArgument, SymIntArgument)) and isinstance(arg, Node):
            renamed[spec.arg.name] = arg.name
            spec = OutputSpec(spec.kind, type(spec.arg)(name=arg.name), target)
        specs.append(spec)
    return specs, renamed


def _call_graph(
    program: ExportedProgram, renamed_inputs: Mapping[str, str], renamed_outputs: Mapping[str, str]
) -> list[ModuleCallEntry]:
    """The module call graph with the root signature's argument names updated."""

    def rename(args: Sequence[Any], names: Mapping[str, str]) -> list[Any]:
        return [
            type(a)(name=names.get(a.name, a.name))
            if isinstance(a, (TensorArgument, SymIntArgument))
            else a
            for a in args
        ]

    entries = []
    for entry in program.module_call_graph:
        signature = entry.signature
        if signature is not None and entry.fqn == "":
            signature = ModuleCallSignature(
                inputs=rename(signature.inputs, renamed_inputs),
                outputs=rename(signature.outputs, renamed_outputs),
                in_spec=signature.in_spec,
                out_spec=signature.out_spec,
                forward_arg_names=signature.forward_arg_names,
            )
        entries.append(ModuleCallEntry(entry.fqn, signature))
    return entries


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

"""aot_autograd's graphs as ExportedPrograms, and what Dynamo says about their inputs."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node


def needs_grad(example_inputs: Sequence[Any]) -> bool:
    """Whether aot_autograd will build a backward graph (as it decides: grad mode on and some
    input, parameters included, requiring grad)."""
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs
    )


def module_weights(gm: GraphModule, example_inputs: Sequence[Any]) -> dict:
    """Dynamo input index -> (name, tensor) for inputs that are module parameters or buffers
    (Dynamo lifts them to inputs; their source says where they came from)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return {}
    weights = {}
    for i, (node, value) in enumerate(zip(placeholders, example_inputs, strict=True)):
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        name = source.name if source is not None else ""
        name = name() if callable(name) else name
        if not isinstance(value, torch.Tensor) or not re.search(r"\._(parameters|buffers)\[", name):
            continue
        keys = [k for k in re.findall(r"\['([^']*)'\]", name) if k != "self"]
        weights[i] = (".".join(keys) or node.name, value)
    return weights


def unmutated_weights(weights: Mapping[int, tuple[str, torch.Tensor]], count: int) -> dict:
    """Drop weights the graph mutates (they change every call: inputs, not weights), and all
    of them if aot_autograd's view of the inputs does not line up with Dynamo's."""
    if not weights:
        return {}
    from torch._guards import TracingContext

    context = TracingContext.try_get()
    metadata = getattr(context, "fw_metadata", None)
    infos = getattr(metadata, "input_info", None)
    if infos is None or len(infos) != count:
        return {}
    return {
        i: w for i, w in weights.items() if not (infos[i].mutates_data or infos[i].mutates_metadata)
    }


def wrappers_pass_through(aot_inputs: Sequence[Any], dynamo_inputs: Sequence[Any]) -> bool:
    """Whether aot_autograd's runtime wrappers would hand this inference graph Dynamo's
    arguments and return its outputs unchanged, so that Dynamo may call the compiled graph
    directly (they cost about 2 us a call: 18k instructions under callgrind, a third of
    what the whole call costs outside Dynamo on a one-delegate model).

    They do work when the graph mutates an input, returns an alias, has effect tokens,
    tensor subclasses, functionalized RNG, dynamic outputs to mark, runs under autocast or
    grad mode, or when its inputs differ from Dynamo's (a tensor passed twice is
    deduplicated, lifted parameters are prepended; synthetic bases need a mutation): any of
    these keeps the wrappers.
    """
    from torch._functorch._aot_autograd.schemas import OutputType, SubclassCreationMeta
    from torch._guards import TracingContext

    context = TracingContext.try_get()
    meta = getattr(context, "fw_metadata", None)
    if meta is None or torch.is_grad_enabled() or torch._C._is_any_autocast_enabled():
        return False
    tensors = [x for x in dynamo_inputs if isinstance(x, torch.Tensor)]
    return (
        len(aot_inputs) == len(dynamo_inputs) == len(meta.input_info)
        and len({id(t) for t in tensors}) == len(tensors)
        and all(map(_same_kind, aot_inputs, dynamo_inputs))
        and not any(i.mutates_data or i.mutates_metadata for i in meta.input_info)
        and all(o.output_type == OutputType.non_alias for o in meta.output_info)
        and meta.num_intermediate_bases == 0
        and not meta.dynamic_outputs
        and meta.grad_enabled_mutation is None
        and not meta.tokens
        and not meta.is_rng_op_functionalized
        and not any(
            isinstance(m, SubclassCreationMeta)
            for m in (*meta.subclass_inp_meta, *meta.subclass_fw_graph_out_meta)
        )
    )


def _same_kind(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.dim() == b.dim()
    return isinstance(a, torch.Tensor) == isinstance(b, torch.Tensor)


def program_from_aten(
    gm: GraphModule,
    example_inputs: Sequence[Any],
    weights: Mapping[int, tuple[str, torch.Tensor]],
):
    """An ExportedProgram over a copy of an aot graph: `weights` (by input index) become
    its parameters, moved first as ExportedProgram wants; the rest are user inputs. Also
    returns the template of outputs and the input order (original indices, program order).

    aot graphs may return constants (None for inputs without gradient, plain ints); those
    leave the program's outputs and come back through the template: one entry per original
    output, None for "the next program output" or a 1-tuple holding the constant.
    """
    from torch._export.verifier import Verifier
    from torch._guards import detect_fake_mode
    from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

    from nativert._program import program_from_graph

    gm = copy.deepcopy(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    order = sorted(range(len(placeholders)), key=lambda i: (i not in weights, i))
    users = [placeholders[i] for i in order if i not in weights]
    if weights and users:
        anchor = users[0]  # every weight moves before the first user input, in order
        for i in order:
            if i in weights:
                anchor.prepend(placeholders[i])
        gm.graph.lint()
        gm.recompile()
    output = gm.graph.output_node()
    (values,) = output.args
    template: list[tuple[Any] | None] | None = None
    if not all(isinstance(v, Node) for v in values):
        template = [None if isinstance(v, Node) else (v,) for v in values]
        output.args = (tuple(v for v in values if isinstance(v, Node)),)
        gm.recompile()

    ranges = {}
    fake_mode = detect_fake_mode(example_inputs)
    shape_env = getattr(fake_mode, "shape_env", None)
    if shape_env is not None:
        for node in gm.graph.nodes:
            if node.op != "placeholder":
                continue
            val = node.meta.get("val")
            dims = val.shape if isinstance(val, torch.Tensor) else [val]
            for dim in dims:
                if isinstance(dim, torch.SymInt):
                    for symbol in dim.node.expr.free_symbols:
                        if symbol in shape_env.var_to_range:
                            ranges[symbol] = shape_env.var_to_range[symbol]
    specs = [
        InputSpec(
            InputKind.PARAMETER
            if isinstance(weights[i][1], torch.nn.Parameter)
            else InputKind.BUFFER,
            TensorArgument(placeholders[i].name),
            weights[i][0],
            persistent=None if isinstance(weights[i][1], torch.nn.Parameter) else True,
        )
        for i in order
        if i in weights
    ]
    tensors = dict(weights.values())
    program = program_from_graph(gm, specs, tensors, range_constraints=ranges, verifiers=[Verifier])
    return program, template, order

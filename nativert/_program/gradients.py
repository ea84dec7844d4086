"""Which outputs of a segment can carry a gradient (autograd must mark the others)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.fx import GraphModule, Node

from nativert._program.signature import placeholder_values


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


def _is_float(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())

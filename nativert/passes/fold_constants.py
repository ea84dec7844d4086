"""Compute once what depends only on weights (inference only).

Problem: graphs recompute weight-only expressions on every call (a weight scaled by a
constant, `rsqrt(var + eps)` of a normalization, a mask built from a buffer). The result is
the same each time.

Guarantees: a maximal subgraph of pure, deterministic, non-view ops whose inputs are all
unmutated weights (or literals) is replaced by one precomputed constant per value that leaves
it. Views are left alone (folding one saves nothing and would alias the weight), and so is a
fold whose result would be larger than its sources. Weights nothing else reads leave the
program; each folded constant records its sources and a graph that recomputes it, for
`refold_weights`. Values are unchanged.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.fx import Graph, GraphModule, Node

from nativert._program import copy_graph_module
from nativert.passes.derived_weights import ConstantInstaller, DerivedWeight, record
from nativert.passes.pass_result import PassResult, is_pure_op


def _foldable_op(node: Node) -> bool:
    target = node.target
    return is_pure_op(node) and not (isinstance(target, torch._ops.OpOverload) and target.is_view)


def _extract(frontier: Node, folded: set[Node], sources: dict[Node, str]) -> tuple:
    """A GraphModule computing `frontier` from its weight sources, and their names."""
    needed: list[Node] = []
    stack, seen = [frontier], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        needed.append(node)
        stack.extend(node.all_input_nodes)
    order = {n: i for i, n in enumerate(frontier.graph.nodes)}
    needed.sort(key=order.__getitem__)
    graph, env = Graph(), {}
    inputs = [n for n in needed if n in sources]
    for node in inputs:
        env[node] = graph.placeholder(node.name)
    for node in needed:
        if node in folded:
            env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[frontier])
    return GraphModule(torch.nn.Module(), graph), [sources[n] for n in inputs], inputs


def fold_constants(program: ExportedProgram) -> PassResult:
    gm = copy_graph_module(program)
    installer = ConstantInstaller(program, gm)
    weights = {**program.state_dict, **program.constants}
    sources: dict[Node, str] = {}
    folded: set[Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            target = installer.weight_target(node)
            if target is not None:
                sources[node] = target
        elif (
            _foldable_op(node)
            and node.all_input_nodes
            and all(a in sources or a in folded for a in node.all_input_nodes)
        ):
            folded.add(node)

    frontier = [
        n
        for n in folded
        if isinstance(n.meta.get("val"), torch.Tensor) and any(u not in folded for u in n.users)
    ]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    modified = False
    for node in sorted(frontier, key=order.__getitem__):
        compute, names, inputs = _extract(node, folded, sources)
        with torch.no_grad():
            value = compute(*(weights[name] for name in names))
        if value.numel() > sum(weights[name].numel() for name in names):
            continue  # folding would grow memory (e.g. a repeat of a weight)
        constant = installer.add(f"folded_{node.name}", value)
        target = installer.new_inputs[constant.name].target
        record(gm, DerivedWeight(target, tuple(names), compute), weights)
        for user in [u for u in node.users if u not in folded]:
            user.replace_input_with(node, constant)
        modified = True
    if not modified:
        return PassResult(program, modified=False)
    gm.graph.eliminate_dead_code()
    installer.drop_unused(list(sources))
    return PassResult(installer.rebuild(), modified=True)

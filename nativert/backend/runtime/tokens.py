"""Effect tokens: the Executor drops them from its prepared graph, as `.module()` does.

torch.export threads a *token* through each op with side effects (`aten._print`, the error
check `aten._linalg_check_errors` after `linalg.inv`, custom ops registered as effectful):
`with_effects(token, op, *args)` runs `op(*args)` and returns `(new_token, *results)`, and
the program takes tokens as inputs (InputKind.TOKEN) and returns them (OutputKind.TOKEN) so
that no pass reorders or drops those ops. Tokens carry no data. At run time the order is
already fixed: the generated code runs the nodes in graph order. So, like torch's
`_remove_effect_tokens` behind `.module()`, each `with_effects` of an operator becomes a
direct call of it, the token inputs disappear from the call, and each token output becomes
None. A program without tokens is left as it is; one with tokens pays nothing per call.

A `with_effects` of a higher-order operator (e.g. `torch._higher_order_ops.print`) stays as
it is, fed a token the graph creates itself (an empty tensor, what torch's tokens are).
"""

from __future__ import annotations

import operator
from collections.abc import Collection

import torch
from torch._higher_order_ops.effects import with_effects
from torch.fx import Graph, Node

from nativert.errors import NativertError


def new_token() -> torch.Tensor:
    """A fresh token, as torch creates them (torch._higher_order_ops.effects)."""
    return torch.tensor([])


def remove_effect_tokens(
    graph: Graph, token_inputs: Collection[str], token_outputs: Collection[int]
) -> None:
    """Drop the token inputs and outputs of `graph` (in place) and call effectful operators
    directly. `token_inputs`: the names of the TOKEN placeholders; `token_outputs`: the
    positions of the TOKEN outputs. Those outputs become None, so every other output keeps
    its position."""
    output = graph.output_node()
    results = list(output.args[0])
    for i in token_outputs:
        results[i] = None
    output.args = (tuple(results),)

    tokens = [n for n in graph.nodes if n.op == "placeholder" and n.name in token_inputs]
    anchor = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(anchor):
        token = graph.call_function(new_token, ())
    for placeholder in tokens:
        placeholder.replace_all_uses_with(token)
        graph.erase_node(placeholder)

    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is with_effects:
            _call_directly(graph, node, token)
    for node in list(graph.nodes):  # the token getitems of a with_effects that stays
        source = node.args[0] if node.target is operator.getitem else None
        if isinstance(source, Node) and source.target is with_effects and node.args[1] == 0:
            if not node.users:
                graph.erase_node(node)
    if not token.users:
        graph.erase_node(token)


def _call_directly(graph: Graph, node: Node, token: Node) -> None:
    """with_effects(token, op, *args, **kwargs) -> op(*args, **kwargs), its getitems rewired:
    [0] (the new token) becomes `token`, [k] the op's k-th result."""
    _, op, *args = node.args
    if not isinstance(op, torch._ops.OpOverload):
        # A higher-order operator (or something no torch writes, which with_effects itself
        # refuses when called): keep the node, fed the graph's own token.
        node.args = (token, *node.args[1:])
        return
    with graph.inserting_before(node):
        direct = graph.call_function(op, tuple(args), dict(node.kwargs))
    direct.meta = dict(node.meta)
    returns = len(op._schema.returns)
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        direct.meta["val"] = val[1] if returns == 1 else tuple(val[1:]) if returns else None
    for user in list(node.users):
        if user.target is not operator.getitem:
            raise NativertError(
                f"node {user.name!r} ({user.target}) uses the result of {node.name!r} "
                f"(with_effects of {op}) as a whole; only its items can be used"
            )
        index = user.args[1]
        if index == 0:
            user.replace_all_uses_with(token)
        elif returns > 1:
            user.args = (direct, index - 1)
            continue
        elif returns == 1 and index == 1:
            user.replace_all_uses_with(direct)
        elif user.users:  # a result the op does not have (torch writes unused ones)
            raise NativertError(
                f"node {user.name!r} reads result {index} of {node.name!r}, but {op} "
                f"returns {returns} value(s)"
            )
        graph.erase_node(user)
    graph.erase_node(node)

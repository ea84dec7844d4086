"""Graph surgery on the top-level program: a fused region's call_module node replaced by
get_attr + call_delegate, or its nodes put back in place (untagged)."""

from __future__ import annotations

from torch.fx import GraphModule, Node

from nativert._program.meta import TAG_KEY
from nativert.call_delegate import HOP_NAME, call_delegate
from nativert.lowered import LoweredBackendModule


def inline(gm: GraphModule, call_node: Node, sub_gm: GraphModule, outer_args) -> dict[str, Node]:
    """Put a fused region's nodes back in place of its call_module node (untagged); return
    the new nodes by the names they had in the region (fusing may rename them)."""
    env = dict(
        zip([n for n in sub_gm.graph.nodes if n.op == "placeholder"], outer_args, strict=True)
    )
    copies: dict[str, Node] = {}
    with gm.graph.inserting_before(call_node):
        for node in sub_gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            copy = gm.graph.node_copy(node, env.__getitem__)
            copy.meta.pop(TAG_KEY, None)
            env[node] = copies[node.name] = copy
    outputs = sub_gm.graph.output_node().args[0]
    for user in list(call_node.users):  # the getitems fusing created
        user.replace_all_uses_with(env[outputs[user.args[1]]])
        gm.graph.erase_node(user)
    gm.graph.erase_node(call_node)
    gm.delete_submodule(call_node.target)
    return copies


def install(
    gm: GraphModule, call_node: Node, lowered: LoweredBackendModule, outer_args, tag
) -> Node:
    """Replace a fused region's call_module node by get_attr + call_delegate."""
    attr, n = f"lowered_{tag}", 0
    while hasattr(gm, attr):  # a program lowered again keeps its earlier delegates
        n += 1
        attr = f"lowered_{tag}_{n}"
    gm.add_submodule(attr, lowered)
    with gm.graph.inserting_before(call_node):
        module_node = gm.graph.get_attr(attr)
        hop_node = gm.graph.create_node(
            "call_function",
            call_delegate,
            (module_node, *outer_args),
            name=f"{HOP_NAME}_{tag}",
        )
    hop_node.meta.update(call_node.meta)
    hop_node.meta[TAG_KEY] = tag
    call_node.replace_all_uses_with(hop_node)
    gm.graph.erase_node(call_node)
    gm.delete_submodule(call_node.target)
    return hop_node

"""Quantized programs: PT2E's quantize / dequantize nodes and the ops they belong to.

A program from PT2E (`prepare_pt2e` -> calibrate -> `convert_pt2e` -> `torch.export`) holds
`quantized_decomposed` ops around each quantized op:

    x -> quantize_per_tensor -> dequantize_per_tensor -> linear -> relu -> quantize -> ...
    w_int8 -> dequantize_per_channel ---------------------^

A runtime turns `dequantize -> op -> quantize` into one int8 kernel only when it sees the
whole pattern. So the partitioner groups nodes into *quantized units* and never cuts one:
a dequantize belongs with the ops that read it, a quantize with the op that produced its
input (or, for a program input, with its dequantize), and dynamic quantization's
`choose_qparams` with the quantize it parameterizes. A region may still end between a
quantize and the dequantize that reads it: what crosses is the int8 tensor.
"""

from __future__ import annotations

import functools
import operator
import platform
from collections.abc import Iterable

import torch
from torch.fx import Graph, Node

# Registers torch.ops.quantized_decomposed (a torch module of op definitions, no side
# effects beyond that): needed before a quantized program is traced, exported or loaded.
import torch.ao.quantization.fx._decomposed  # noqa: F401  isort: skip

_qd = torch.ops.quantized_decomposed

QUANTIZE_OPS = frozenset(
    {
        _qd.quantize_per_tensor.default,
        _qd.quantize_per_tensor.tensor,
        _qd.quantize_per_tensor.tensor2,
        _qd.quantize_per_channel.default,
    }
)
DEQUANTIZE_OPS = frozenset(
    {
        _qd.dequantize_per_tensor.default,
        _qd.dequantize_per_tensor.tensor,
        _qd.dequantize_per_tensor.tensor2,
        _qd.dequantize_per_channel.default,
    }
)
QPARAMS_OPS = frozenset({_qd.choose_qparams.tensor})
QDQ_OPS = QUANTIZE_OPS | DEQUANTIZE_OPS | QPARAMS_OPS
INT8 = "int8"  # the precision of a region that computes with int8 kernels


def is_qdq(node: Node) -> bool:
    return node.op == "call_function" and node.target in QDQ_OPS


def is_quantized(nodes: Iterable[Node]) -> bool:
    """Whether any of `nodes` quantizes or dequantizes: a region an int8 kernel can run."""
    return any(is_qdq(n) for n in nodes)


def quantized_units(graph: Graph) -> list[list[Node]]:
    """The quantized units of `graph` with more than one node, each in graph order (see the
    module docstring). Nodes in no list belong to no unit."""
    parent: dict[Node, Node] = {}

    def find(node: Node) -> Node:
        root = node
        while parent.get(root, root) is not root:
            root = parent[root]
        while node is not root:  # path compression
            parent[node], node = root, parent[node]
        return root

    members: set[Node] = set()

    def union(a: Node, b: Node) -> None:
        members.update((a, b))
        ra, rb = find(a), find(b)
        if ra is not rb:
            parent[ra] = rb

    for node in graph.nodes:
        if not is_qdq(node):
            continue
        if node.target in DEQUANTIZE_OPS:
            for user in node.users:
                if user.op == "call_function":
                    union(node, user)
        elif node.target in QUANTIZE_OPS:
            source = node.args[0]
            if isinstance(source, Node) and source.op == "call_function":
                union(node, source)
            else:  # a quantized program input: with the dequantize that reads it
                for user in node.users:
                    if user.op == "call_function" and user.target in DEQUANTIZE_OPS:
                        union(node, user)
        else:  # choose_qparams -> getitem (scale, zero point) -> quantize
            for item in node.users:
                union(node, item)
                if item.target is operator.getitem:
                    for user in item.users:
                        union(item, user)
    groups: dict[Node, list[Node]] = {}
    for node in graph.nodes:
        if node in members:
            groups.setdefault(find(node), []).append(node)
    return [nodes for nodes in groups.values() if len(nodes) > 1]


def split_units(graph: Graph, tag_of: dict[Node, str | None]) -> list[tuple[list[Node], set]]:
    """The quantized units whose nodes do not all get one tag (None: kept in PyTorch), each
    with the tags it spans: what a partitioner must never produce."""
    split = []
    for unit in quantized_units(graph):
        tags = {tag_of.get(n) for n in unit}
        if len(tags) > 1:
            split.append((unit, tags))
    return split


@functools.cache
def cpu_has_int8_dot() -> bool:
    """Whether this x86 CPU multiplies uint8 by int8 without saturating (VNNI or AMX).

    Without it (AVX2, AVX-512 without VNNI) the u8 x s8 kernels ONNX Runtime and oneDNN use
    add pairs of products in int16 and saturate: measured here (AVX2), 10-14% error on an
    MLP where the same program computes exactly with unsigned weights. Not x86: True."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    except OSError:
        pass
    return False


def full_range(dtype: torch.dtype) -> tuple[int, int]:
    info = torch.iinfo(dtype)
    return info.min, info.max

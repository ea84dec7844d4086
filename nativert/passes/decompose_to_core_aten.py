"""Decompose a program to functional core ATen, keeping whole the ops delegates prefer.

Problem: `torch.export.export` gives training IR, where in-place buffer updates (batch-norm
running stats) and composite ops (linear, layer_norm) remain. Partitioning needs functional
nodes: a segment must not mutate state that lives outside it, and support tables are written
against core ATen.

Guarantees: the result is functional (mutations appear as outputs in the graph signature),
verifies, computes the same values, and every op in `preserve` that was in the graph stays
a single node instead of being decomposed.

The torch.compile path decomposes while aot_autograd traces, with `decomposition_table`:
the same core ATen table minus the same preserved ops. Composite-implicit ops (linear,
layer_norm, scaled_dot_product_attention) decompose while aot_autograd traces whatever the
table says; for inference graphs `keeping_composite_ops_whole` keeps the preserved ones whole
as well, as `run_decompositions` does, so both paths hand the partitioner the same ops.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator

import torch
from torch.export import ExportedProgram

from nativert.passes.pass_result import PassResult


def decompose_to_core_aten(
    program: ExportedProgram,
    *,
    preserve: Iterable[torch._ops.OpOverload] = (),
) -> PassResult:
    table = _ours(torch.export.default_decompositions(), preserve)
    before = [(n.op, n.target) for n in program.graph.nodes]
    decomposed = program.run_decompositions(table)
    after = [(n.op, n.target) for n in decomposed.graph.nodes]
    return PassResult(decomposed, modified=before != after)


def _multilabel_margin_loss_forward(input, target, reduction):
    """MultiLabelMarginLoss. torch 2.13's decomposition counts target slots after the first
    -1 as if they named class 0 (eager: 0.325, it: 2.875 for [[3, -1, 1, 2]]), and gives a
    vector's unreduced loss shape [1] where the op gives a 0-d loss. Same ops, both fixed."""
    x, t = torch.atleast_2d(input), torch.atleast_2d(target)
    dim = x.shape[1]
    torch._check(  # the op's own checks, as torch's decomposition makes them
        input.dim() <= 2 and dim != 0,
        lambda: (
            f"Expected non-empty vector or matrix with optional 0-dim batch size, but got: "
            f"{input.shape}"
        ),
    )
    torch._check(
        input.dim() <= 2 and target.shape == input.shape,
        lambda: f"inconsistent target size: {target.shape} for input of size: {input.shape}",
    )
    idx = torch.arange(dim, device=t.device)
    end = torch.amin(torch.where(t == -1, idx, dim), dim=-1, keepdim=True)
    used = idx < end  # [batch, slot]: the slots before the first -1
    picked = torch.gather(x, -1, torch.where(used, t, 0))  # x[b, t[b, k]]
    is_target = torch.any(idx == torch.where(used, t, -1).unsqueeze(-1), dim=1)
    # [batch, slot k, class j]: the margin of target t[b, k] over non-target class j
    z = (1.0 - picked.unsqueeze(-1) + x.unsqueeze(1)).clamp_min(0) / dim
    z = torch.where(used.unsqueeze(-1) & ~is_target.unsqueeze(1), z, 0.0)
    loss = z.sum(dim=(1, 2))
    if reduction == 1:  # Reduction.MEAN
        loss = loss.mean()
    elif reduction == 2:  # Reduction.SUM
        loss = loss.sum()
    elif input.dim() <= 1:
        loss = loss.reshape(())
    return loss, is_target.to(input.dtype).reshape(target.shape)


def _ours(table: dict, preserve: Iterable[torch._ops.OpOverload]) -> dict:
    """`table` (changed in place) without the preserved ops, with our corrections: what both
    paths decompose with."""
    for op in preserve:
        table.pop(op, None)
    table.update({op: fn for op, fn in _corrected().items() if op in table})
    return table


@functools.cache
def _corrected() -> dict:
    """Decompositions of torch's that compute something else than the op, and ours."""
    return {torch.ops.aten.multilabel_margin_loss_forward.default: _multilabel_margin_loss_forward}


# torch 2.13's decomposition of CPU flash attention returns the attention weights where the
# op returns logsumexp. Only the backward reads that output, so inference may decompose it
# (delegates then see plain matmuls and softmax), but training must keep the op whole or its
# gradients are wrong (found by the torch.compile transformer training test).
_WRONG_FOR_TRAINING = (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,)
# Training saves layer norm's mean and rstd for the backward; as one node its extra outputs
# cannot leave an ONNX segment (the exporter drops them), as plain ops they can, so the whole
# forward stays delegable.
_DECOMPOSED_FOR_TRAINING = (torch.ops.aten.native_layer_norm.default,)


@functools.cache
def decomposition_table(preserve: frozenset[torch._ops.OpOverload], *, training: bool) -> dict:
    """aot_autograd's decompositions: core ATen minus `preserve`, with the training fixes."""
    from torch._decomp import core_aten_decompositions, get_decompositions

    table = _ours(dict(core_aten_decompositions()), preserve)
    if training:
        for op in _WRONG_FOR_TRAINING:
            table.pop(op, None)
        table.update(get_decompositions(_DECOMPOSED_FOR_TRAINING))
    return table


@contextlib.contextmanager
def keeping_composite_ops_whole(preserve: Iterable[torch._ops.OpOverload]) -> Iterator[None]:
    """While active, tracing (aot_autograd, make_fx) keeps the composite-implicit ops of
    `preserve` as single nodes instead of running their decompositions.

    Inference only: such an op has no autograd formula of its own (the override makes its
    autograd kernel raise when a backward is built). It patches the ops' Python kernels
    globally, so end it before anything else traces (torch.onnx's exporter runs
    `run_decompositions`, which patches them too). This is what `run_decompositions` does
    for the ops it preserves, with torch's private helpers: the torch.compile tests
    (tests/backend/compile/test_backend.py) fail loudly if torch moves them.
    """
    from torch._export.utils import _is_preservable_cia_op, _special_op_to_preserve_cia
    from torch.export.exported_program import _override_composite_implicit_decomp

    ops = {op: _special_op_to_preserve_cia for op in preserve if _is_preservable_cia_op(op)}
    if not ops:
        yield
        return
    with _override_composite_implicit_decomp(ops):
        yield

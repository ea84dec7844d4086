"""`torch.ops.higher_order.nativert_call_delegate`: call a lowered segment from a graph.

`call_delegate(lowered, *flat_args) -> tuple[Tensor, ...]`, where `flat_args` are the
segment's weights then its inputs. One implementation per dispatch case:

- CompositeExplicitAutograd: real tensors run on the delegate executor.
- Autograd: a `torch.autograd.Function` whose forward calls the delegate below autograd and
  whose backward recomputes the segment's reference graph and differentiates it, so gradients
  are real (and differentiable again: double backward works).
- FakeTensorMode: output metadata from the reference graph run on fake inputs; weights are
  arguments, so no real tensor meets a fake one and symbolic shapes flow through.
- ProxyTorchDispatchMode (make_fx, export, aot_autograd): one node whose first argument is a
  `get_attr` of the lowered module's weight-free view.
- Functionalization: the segment is functional; unwrap, redispatch, wrap.

Outputs never alias inputs or each other; every implementation keeps that promise.
Dynamo support (tracing the HOP instead of graph-breaking) is registered by
`nativert._dynamo_hop`, which `import nativert` loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.utils._pytree as pytree
from torch._higher_order_ops.utils import register_fake
from torch._ops import HigherOrderOperator
from torch.fx.experimental.proxy_tensor import (
    ProxyTorchDispatchMode,
    disable_proxy_modes_tracing,
    track_tensor_tree,
)

from nativert._program import unalias_outputs
from nativert.errors import DelegateCallError

HOP_NAME = "nativert_call_delegate"


class CallDelegate(HigherOrderOperator):
    def __init__(self) -> None:
        # The name must be unique: HigherOrderOperator silently replaces a HOP of the same name.
        super().__init__(HOP_NAME)

    def __call__(self, lowered_module: Any, *args: Any) -> tuple[torch.Tensor, ...]:
        return super().__call__(lowered_module, *args)


call_delegate = CallDelegate()


@runtime_checkable
class Delegated(Protocol):
    """What call_delegate needs of its first argument (nativert's LoweredBackendModule);
    checked by shape so that this module does not import the lowered module's."""

    module_name: str
    mutated_arg_indices: frozenset[int]
    nondifferentiable_outputs: frozenset[int]

    def run_delegate(self, flat_args: Sequence[Any]) -> tuple[torch.Tensor, ...]: ...

    def run_reference(self, flat_args: Sequence[Any]) -> tuple[Any, ...]: ...

    def graph_view(self) -> Any: ...


_DELEGATED_TYPES: set[type] = set()  # types that passed the (slow) protocol check


def _check_lowered(lowered_module: Any) -> None:
    if type(lowered_module) in _DELEGATED_TYPES:
        return
    if isinstance(lowered_module, str):
        raise DelegateCallError(
            f"this program calls delegate {lowered_module!r} by name only: it was loaded by "
            "torch.export.load, which does not keep delegates. Save with nativert.save and "
            "load with nativert.load"
        )
    if not isinstance(lowered_module, Delegated):
        raise DelegateCallError(
            "call_delegate's first argument must be a nativert LoweredBackendModule, got "
            f"{type(lowered_module).__name__}"
        )
    _DELEGATED_TYPES.add(type(lowered_module))


@call_delegate.py_impl(torch._C.DispatchKey.CompositeExplicitAutograd)
def _call_delegate_dense(lowered_module: Any, *args: Any) -> tuple[torch.Tensor, ...]:
    _check_lowered(lowered_module)
    return lowered_module.run_delegate(args)


@register_fake(call_delegate, skip_cache=True)
def _call_delegate_fake(lowered_module: Any, *args: Any) -> tuple[Any, ...]:
    _check_lowered(lowered_module)
    return unalias_outputs(lowered_module.run_reference(args), args)


@call_delegate.py_functionalize_impl
def _call_delegate_functionalize(ctx: Any, lowered_module: Any, *args: Any) -> Any:
    unwrapped = ctx.unwrap_tensors(args)
    with ctx.redispatch_to_next():
        out = call_delegate(lowered_module, *unwrapped)
    return ctx.wrap_tensors(out)


def _install_module(root: torch.nn.Module, module: torch.nn.Module) -> str:
    """Attach `module` to the tracing root once; return its attribute name."""
    for name, child in root.named_children():
        if child is module:
            return name
    base = "lowered_" + "".join(c if c.isalnum() else "_" for c in module.module_name)
    name, i = base, 0
    while hasattr(root, name):
        i += 1
        name = f"{base}_{i}"
    root.add_module(name, module)
    return name


@call_delegate.py_impl(ProxyTorchDispatchMode)
def _call_delegate_proxy(mode: ProxyTorchDispatchMode, lowered_module: Any, *args: Any) -> Any:
    _check_lowered(lowered_module)
    with disable_proxy_modes_tracing():
        out = call_delegate(lowered_module, *args)
    view = lowered_module.graph_view()
    _install_module(mode.tracer.root, view)
    proxy_args = pytree.tree_map(mode.tracer.unwrap_proxy, (view, *args))
    out_proxy = mode.tracer.create_proxy(
        "call_function", call_delegate, proxy_args, {}, name=HOP_NAME
    )
    return track_tensor_tree(out, out_proxy, constant=None, tracer=mode.tracer)


class _CallDelegateFunction(torch.autograd.Function):
    """Forward on the delegate; backward by differentiating the reference graph."""

    @staticmethod
    def forward(ctx: Any, lowered_module: Any, *args: Any) -> tuple[torch.Tensor, ...]:
        with torch._C._AutoDispatchBelowAutograd():
            outputs = call_delegate(lowered_module, *args)
        ctx.lowered_module = lowered_module
        # Save tensors by reference (with autograd's in-place checks) except those the caller
        # mutates right after this call, e.g. batch-norm running stats: snapshot those.
        saved, layout = [], []
        for i, arg in enumerate(args):
            if not isinstance(arg, torch.Tensor):
                layout.append(("const", arg))
            elif i in lowered_module.mutated_arg_indices:
                layout.append(("const", arg.detach().clone()))
            else:
                layout.append(("saved", len(saved)))
                saved.append(arg)
        ctx.save_for_backward(*saved)
        ctx.layout = layout
        nondiff = lowered_module.nondifferentiable_outputs
        ctx.mark_non_differentiable(
            *(
                out
                for i, out in enumerate(outputs)
                if i in nondiff or not (out.is_floating_point() or out.is_complex())
            )
        )
        return outputs

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> tuple[Any, ...]:
        saved = ctx.saved_tensors
        args = [saved[v] if kind == "saved" else v for kind, v in ctx.layout]
        wanted = [
            i
            for i, arg in enumerate(args)
            if isinstance(arg, torch.Tensor) and ctx.needs_input_grad[i + 1]
        ]
        create_graph = torch.is_grad_enabled()
        if not create_graph:
            # Recompute on detached leaves: no graph back into the caller's forward.
            for i in wanted:
                args[i] = args[i].detach().requires_grad_(True)
        with torch.enable_grad():
            outputs = ctx.lowered_module.run_reference(args)
        pairs = [
            (out, grad)
            for out, grad in zip(outputs, grad_outputs, strict=True)
            if isinstance(out, torch.Tensor) and out.requires_grad and grad is not None
        ]
        grads: list[Any] = [None] * len(args)
        if pairs and wanted:
            found = torch.autograd.grad(
                [out for out, _ in pairs],
                [args[i] for i in wanted],
                [grad for _, grad in pairs],
                create_graph=create_graph,
                allow_unused=True,
            )
            for i, grad in zip(wanted, found, strict=True):
                grads[i] = grad if grad is not None else torch.zeros_like(args[i])
        return (None, *grads)


@call_delegate.py_autograd_impl
def _call_delegate_autograd(lowered_module: Any, *args: Any) -> tuple[torch.Tensor, ...]:
    _check_lowered(lowered_module)
    return _CallDelegateFunction.apply(lowered_module, *args)


def delegate_nodes(program: Any) -> list[torch.fx.Node]:
    """The call_delegate nodes of an ExportedProgram, in graph order."""
    return [n for n in program.graph.nodes if n.op == "call_function" and n.target is call_delegate]


def lowered_modules(program: Any) -> list[Any]:
    """The LoweredBackendModule each call_delegate node calls, in graph order."""
    return [
        program.graph_module.get_submodule(node.args[0].target) for node in delegate_nodes(program)
    ]

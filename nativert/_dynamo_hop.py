"""Teach Dynamo to trace `nativert_call_delegate` instead of graph-breaking on it.

Dynamo graph-breaks on a HigherOrderOperator it does not know (and fails under
`fullgraph=True`). It looks HOPs up by name in
`torch._dynamo.variables.higher_order_ops._hop_name_to_variable_class`: registering a
`TorchHigherOrderOperatorVariable` subclass there makes `torch.compile(fullgraph=True)`,
strict `torch.export` and training through aot_autograd see one call_delegate node.

This is private torch API, so it is kept here alone; tests/test_dynamo_hook.py fails loudly if
torch moves it. The example value comes from our fake implementation: the lowered module's
weights are graph inputs, so no real tensor meets a fake one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._dynamo.variables import higher_order_ops as _hops

from nativert.call_delegate import HOP_NAME, call_delegate
from nativert.errors import NativertError


def _lowered_module_of(tx: Any, var: Any) -> Any:
    from torch._dynamo import variables

    if isinstance(var, variables.NNModuleVariable):
        return tx.output.get_submodule(var.module_key)
    if isinstance(var, variables.UnspecializedNNModuleVariable):
        return var.value
    _hops.unimplemented(
        gb_type="nativert_call_delegate: first argument not a module",
        context=str(var),
        explanation="call_delegate expects a LoweredBackendModule as its first argument",
        hints=[],
    )


class CallDelegateHigherOrderVariable(_hops.TorchHigherOrderOperatorVariable):
    _HOP_NAME = f"torch.ops.higher_order.{HOP_NAME}"

    def _call_function(self, tx: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
        from torch._dynamo.utils import get_fake_value
        from torch._dynamo.variables.builder import wrap_fx_proxy

        if kwargs:
            _hops.unimplemented(
                gb_type="nativert_call_delegate: keyword arguments",
                context=f"kwargs: {kwargs}",
                explanation="call_delegate takes positional arguments only",
                hints=[],
            )
        lowered = _lowered_module_of(tx, args[0]).graph_view()
        module_proxy = tx.output.register_static_attr_and_return_proxy("nativert_delegate", lowered)
        arg_proxies = tuple(arg.as_proxy() for arg in args[1:])
        fake_args = torch.utils._pytree.tree_map_only(
            torch.fx.Proxy, lambda p: get_fake_value(p.node, tx), arg_proxies
        )
        with tx.fake_mode:
            example_value = call_delegate(lowered, *fake_args)
        return wrap_fx_proxy(
            tx=tx,
            proxy=tx.output.create_proxy(
                "call_function", self.value, args=(module_proxy, *arg_proxies), kwargs={}
            ),
            example_value=example_value,
        )


def _register() -> None:
    table = getattr(_hops, "_hop_name_to_variable_class", None)
    if not isinstance(table, dict) or not hasattr(_hops, "TorchHigherOrderOperatorVariable"):
        raise NativertError(
            "this torch no longer has torch._dynamo.variables.higher_order_ops."
            "_hop_name_to_variable_class; nativert's Dynamo support (nativert/_dynamo_hop.py) "
            f"must be ported to torch {torch.__version__}"
        )
    table[HOP_NAME] = CallDelegateHigherOrderVariable


_register()

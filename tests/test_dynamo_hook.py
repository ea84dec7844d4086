"""Fails loudly when torch moves the private Dynamo hook that nativert's HOP support uses."""

from __future__ import annotations

from torch._dynamo.variables import higher_order_ops

import nativert  # noqa: F401  (registers the hook)
from nativert._dynamo_hop import CallDelegateHigherOrderVariable
from nativert.call_delegate import HOP_NAME, call_delegate


def test_private_hop_table_exists_and_holds_our_variable():
    table = getattr(higher_order_ops, "_hop_name_to_variable_class", None)
    assert isinstance(table, dict), (
        "torch._dynamo.variables.higher_order_ops._hop_name_to_variable_class is gone: "
        "port nativert/_dynamo_hop.py to this torch"
    )
    assert table[HOP_NAME] is CallDelegateHigherOrderVariable
    assert issubclass(
        CallDelegateHigherOrderVariable, higher_order_ops.TorchHigherOrderOperatorVariable
    )


def test_dynamo_builds_our_variable_for_the_hop():
    variable = higher_order_ops.TorchHigherOrderOperatorVariable.make(call_delegate)
    assert type(variable) is CallDelegateHigherOrderVariable

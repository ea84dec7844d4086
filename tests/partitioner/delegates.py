"""Test delegates: real delegates (they run the reference graph) with restricted tables."""

from __future__ import annotations

import torch

from nativert.backend.delegates.eager import EagerDelegate
from nativert.delegate import SupportTable

aten = torch.ops.aten


class TableDelegate(EagerDelegate):
    """Runs like eager, but only what its support table accepts."""

    def __init__(self, backend_id: str, table: SupportTable) -> None:
        self.backend_id = backend_id
        self.table = table

    def check_support(self, node):
        return self.table.check(node)


def adds(backend_id: str = "adds") -> TableDelegate:
    return TableDelegate(backend_id, SupportTable.of([aten.add.Tensor]))


def muls(backend_id: str = "muls") -> TableDelegate:
    return TableDelegate(backend_id, SupportTable.of([aten.mul.Tensor]))

"""The partitioner contract: partitioners only tag nodes; one shared step lowers the regions.

A partitioner sets `node.meta["delegation_tag"]` on the nodes each delegate will run and
returns the tags with their DelegationSpecs. It also says which ops decomposition must keep
whole for its delegates (`ops_to_preserve`), since decomposition runs before it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
from torch.export import ExportedProgram

from nativert._program.meta import PIN_KEY, REASON_KEY, TAG_KEY
from nativert.delegate.contract import CompileSpec

__all__ = [
    "PIN_KEY",
    "REASON_KEY",
    "TAG_KEY",
    "DelegationSpec",
    "PartitionResult",
    "Partitioner",
]


@dataclasses.dataclass(frozen=True)
class DelegationSpec:
    """Which delegate runs a tagged region, and with which compile options."""

    backend_id: str
    compile_specs: tuple[CompileSpec, ...] = ()


@dataclasses.dataclass(frozen=True)
class PartitionResult:
    """`tagged_program` carries node.meta["delegation_tag"]; `tags` maps each tag to a spec."""

    tagged_program: ExportedProgram
    tags: Mapping[str, DelegationSpec]


@runtime_checkable
class Partitioner(Protocol):
    def partition(self, program: ExportedProgram) -> PartitionResult:
        """Tag `program`'s nodes (and nothing else); return it with the tags' specs."""
        ...

    def ops_to_preserve(self) -> frozenset[torch._ops.OpOverload]:
        """Ops that decomposition, which runs before partitioning, must keep whole."""
        ...

"""The partitioner contract: partitioners only tag nodes; to_backend does the lowering."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from torch.export import ExportedProgram

from nativert.backend.delegate import CompileSpec

TAG_KEY = "delegation_tag"
REASON_KEY = "nativert_not_delegated"
# A node whose meta has this key stays in PyTorch; the value is the reason reported.
PIN_KEY = "nativert_keep_in_pytorch"


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
    def partition(self, program: ExportedProgram) -> PartitionResult: ...

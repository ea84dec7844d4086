"""The result every pass returns."""

from __future__ import annotations

import dataclasses

from torch.export import ExportedProgram


@dataclasses.dataclass(frozen=True)
class PassResult:
    """A pass's output program and whether it changed anything."""

    program: ExportedProgram
    modified: bool

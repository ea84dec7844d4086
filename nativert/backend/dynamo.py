"""The `torch.compile(model, backend="nativert")` entry point.

Reserved by the foundation; the backend itself (aot_autograd, partitioning, executor) is built
in its own issue. Until then it fails loudly instead of silently running something else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def nativert_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    raise NotImplementedError(
        'torch.compile(backend="nativert") is not built yet in this version of nativert; '
        "use nativert.to_backend(torch.export.export(model, args)) meanwhile"
    )

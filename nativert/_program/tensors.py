"""Checks and guarantees on the tensors that cross a delegate boundary."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from nativert.errors import WeightsError


def validate_weights(
    expected: Mapping[str, Any],
    given: Mapping[str, torch.Tensor],
    *,
    owner: str,
) -> None:
    """Check names, dtypes and static shapes of `given` against `expected` fake values."""
    missing = [name for name in expected if name not in given]
    unexpected = [name for name in given if name not in expected]
    if missing or unexpected:
        raise WeightsError(
            f"{owner}: weights do not match: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}; pass exactly {sorted(expected)}"
        )
    for name, want in expected.items():
        got = given[name]
        if not isinstance(got, torch.Tensor):
            raise WeightsError(
                f"{owner}: weight {name!r} must be a Tensor, got {type(got).__name__}"
            )
        if got.layout != torch.strided:
            raise WeightsError(
                f"{owner}: weight {name!r} is a {got.layout} tensor; delegates take dense "
                f"weights: pass {name!r}.to_dense()"
            )
        if got.dtype != want.dtype:
            raise WeightsError(
                f"{owner}: weight {name!r} has dtype {got.dtype}, expected {want.dtype}"
            )
        if got.device.type != want.device.type:
            raise WeightsError(
                f"{owner}: weight {name!r} is on {got.device}, expected {want.device.type}"
            )
        if tuple(got.shape) != tuple(want.shape):
            raise WeightsError(
                f"{owner}: weight {name!r} has shape {tuple(got.shape)}, "
                f"expected {tuple(want.shape)}"
            )


def _storage_key(t: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(t.untyped_storage())


def unalias_outputs(outputs: Iterable[Any], inputs: Sequence[Any]) -> tuple[Any, ...]:
    """Clone outputs that share storage with an input or an earlier output.

    Callers of call_delegate may rely on outputs being fresh tensors (torch's tracing does),
    while a graph run in PyTorch may return an input, a view of it, or one tensor twice.
    """
    seen = {_storage_key(t) for t in inputs if isinstance(t, torch.Tensor)}
    fresh = []
    for out in outputs:
        if isinstance(out, torch.Tensor):
            key = _storage_key(out)
            if key in seen:
                out = out.clone()
                key = _storage_key(out)
            seen.add(key)
        fresh.append(out)
    return tuple(fresh)


def storage_reach(size: Sequence[int], stride: Sequence[int], offset: int) -> int:
    """How many storage elements a strided view reaches (0 for an empty tensor)."""
    if not all(size):
        return 0
    return offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1

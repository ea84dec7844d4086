"""Weight update checks for the Executor, naming each weight by its state_dict key."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from nativert._program import validate_weights
from nativert.errors import WeightsError


def validate_update(
    current: Mapping[str, torch.Tensor],
    given: Mapping[str, torch.Tensor],
    *,
    strict: bool,
    required: frozenset[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Names missing from / unexpected in an update; raise for bad names (strict), shapes or
    dtypes, naming the weight. Only `required` names (default: all) count as missing."""
    missing = sorted((set(current) if required is None else required) - set(given))
    unexpected = sorted(set(given) - set(current))
    if strict and (missing or unexpected):
        raise WeightsError(
            f"update_weights(strict=True): missing {missing or 'none'}, unexpected "
            f"{unexpected or 'none'}; pass every weight, or strict=False for a partial update"
        )
    common = [k for k in given if k in current]
    validate_weights(
        {k: current[k] for k in common}, {k: given[k] for k in common}, owner="update_weights"
    )
    return missing, unexpected

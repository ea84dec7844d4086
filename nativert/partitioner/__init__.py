"""Partitioners tag nodes with the delegate that will run them."""

from nativert.partitioner.base import (
    REASON_KEY,
    TAG_KEY,
    DelegationSpec,
    Partitioner,
    PartitionResult,
)
from nativert.partitioner.capability import AllNodePartitioner, CapabilityPartitioner

__all__ = [
    "REASON_KEY",
    "TAG_KEY",
    "AllNodePartitioner",
    "CapabilityPartitioner",
    "DelegationSpec",
    "PartitionResult",
    "Partitioner",
]

"""Partitioners tag nodes with the delegate that will run them."""

from nativert.partitioner.base import (
    REASON_KEY,
    TAG_KEY,
    DelegationSpec,
    Partitioner,
    PartitionResult,
)
from nativert.partitioner.capability import AllNodePartitioner, CapabilityPartitioner
from nativert.partitioner.report import DelegationReport, Region, delegation_report
from nativert.partitioner.support import (
    SupportTable,
    all_of,
    constant_args,
    dtypes,
    max_rank,
    static_shapes,
)

__all__ = [
    "REASON_KEY",
    "TAG_KEY",
    "AllNodePartitioner",
    "CapabilityPartitioner",
    "DelegationReport",
    "Region",
    "SupportTable",
    "all_of",
    "constant_args",
    "delegation_report",
    "dtypes",
    "max_rank",
    "static_shapes",
    "DelegationSpec",
    "PartitionResult",
    "Partitioner",
]

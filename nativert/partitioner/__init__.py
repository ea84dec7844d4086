"""Partitioners tag nodes with the delegate that will run them.

base: the contract; capability: the capability-based partitioner; report: the delegation
report. Support tables live in `nativert.delegate` (re-exported here for partitioner authors).
"""

from nativert.delegate.support import (
    SupportTable,
    all_of,
    constant_args,
    dtypes,
    max_rank,
    static_shapes,
)
from nativert.partitioner.base import (
    REASON_KEY,
    TAG_KEY,
    DelegationSpec,
    Partitioner,
    PartitionResult,
)
from nativert.partitioner.capability import AllNodePartitioner, CapabilityPartitioner
from nativert.partitioner.report import DelegationReport, Region, delegation_report

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

"""The bottom layer: what a delegate is, which ones exist, and what they support.

contract: the compile-time `Delegate` base and the run-time `DelegateExecutor` protocol;
registry: backend ids in explicit priority order (plus the `nativert_delegates` entry
points); support: per-op support tables and checkers; reference: the executor that runs a
segment's reference graph. Nothing here imports from the layers above.
"""

from nativert.delegate.contract import (
    FP32,
    INT8,
    PRECISION_SPEC,
    PRECISIONS,
    SPEC_PRECISIONS,
    TORCH_DTYPES,
    Availability,
    CompileSpec,
    Delegate,
    DelegateExecutor,
    StagedWeights,
    dict_to_specs,
    package_versions,
    spec_precision,
)
from nativert.delegate.reference import ReferenceExecutor
from nativert.delegate.registry import (
    ENTRY_POINT_GROUP,
    default_delegates,
    get_delegate,
    is_registered,
    list_delegates,
    register_delegate,
    require_available,
    unregister_delegate,
)
from nativert.delegate.support import (
    SupportTable,
    all_of,
    constant_args,
    dtypes,
    max_rank,
    static_shapes,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "FP32",
    "INT8",
    "PRECISIONS",
    "SPEC_PRECISIONS",
    "PRECISION_SPEC",
    "TORCH_DTYPES",
    "Availability",
    "CompileSpec",
    "Delegate",
    "DelegateExecutor",
    "ReferenceExecutor",
    "StagedWeights",
    "SupportTable",
    "all_of",
    "constant_args",
    "default_delegates",
    "dict_to_specs",
    "dtypes",
    "get_delegate",
    "is_registered",
    "list_delegates",
    "max_rank",
    "package_versions",
    "register_delegate",
    "spec_precision",
    "require_available",
    "static_shapes",
    "unregister_delegate",
]

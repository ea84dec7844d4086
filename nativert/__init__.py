"""nativert: delegate parts of a torch.export program to real inference runtimes.

import torch, nativert
ep = torch.export.export(model, (x,))
delegated = nativert.to_backend(ep)     # still an ExportedProgram
nativert.Executor(delegated)(x)

Layers, bottom up (imports only run downward): `delegate` (the contracts, the registry,
support tables), `settings`, `call_delegate` and `lowered` (the operator and the data it
calls), `passes`, `partitioner`, then `backend` (the one pipeline, the torch.compile
backend, the runtime, packages and the built-in delegates) and `cli`.
"""

from nativert import _dynamo_hop  # noqa: F401  (teaches Dynamo to trace call_delegate)
from nativert._version import __version__
from nativert.backend.compile import CompileReport, compile_reports, last_compile_report
from nativert.backend.delegates import register_builtin_delegates as _register_builtins
from nativert.backend.package import load, save
from nativert.backend.runtime import Executor
from nativert.backend.to_backend import to_backend
from nativert.call_delegate import call_delegate, delegate_nodes, lowered_modules
from nativert.delegate import (
    Availability,
    CompileSpec,
    Delegate,
    DelegateExecutor,
    StagedWeights,
    SupportTable,
    get_delegate,
    list_delegates,
    register_delegate,
    unregister_delegate,
)
from nativert.errors import (
    DelegateCallError,
    DelegateCompileError,
    DelegateLoadError,
    DelegateUnavailableError,
    LoweringError,
    NativertError,
    PackageError,
    PartitionError,
    SettingsError,
    UnknownDelegateError,
    WeightsError,
)
from nativert.lowered import LoweredBackendModule
from nativert.partitioner import (
    AllNodePartitioner,
    CapabilityPartitioner,
    DelegationReport,
    DelegationSpec,
    Partitioner,
    PartitionResult,
    delegation_report,
)
from nativert.passes import PassResult
from nativert.quantize import quantize
from nativert.settings import Settings

_register_builtins()

__all__ = [
    "quantize",
    "AllNodePartitioner",
    "Availability",
    "CapabilityPartitioner",
    "CompileReport",
    "CompileSpec",
    "Delegate",
    "DelegateCallError",
    "DelegateCompileError",
    "DelegateExecutor",
    "DelegateLoadError",
    "DelegateUnavailableError",
    "DelegationReport",
    "DelegationSpec",
    "Executor",
    "LoweredBackendModule",
    "LoweringError",
    "NativertError",
    "PackageError",
    "PartitionError",
    "PartitionResult",
    "Partitioner",
    "PassResult",
    "Settings",
    "SettingsError",
    "StagedWeights",
    "SupportTable",
    "UnknownDelegateError",
    "WeightsError",
    "__version__",
    "call_delegate",
    "compile_reports",
    "delegate_nodes",
    "delegation_report",
    "get_delegate",
    "last_compile_report",
    "list_delegates",
    "load",
    "lowered_modules",
    "register_delegate",
    "save",
    "to_backend",
    "unregister_delegate",
]

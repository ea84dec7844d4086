"""nativert: delegate parts of a torch.export program to real inference runtimes.

import torch, nativert
ep = torch.export.export(model, (x,))
delegated = nativert.to_backend(ep)     # still an ExportedProgram
delegated.module()(x)
"""

from nativert.backend.delegate import (
    Availability,
    CompileSpec,
    Delegate,
    DelegateExecutor,
    get_delegate,
    list_delegates,
    register_delegate,
    unregister_delegate,
)
from nativert.backend.delegates import register_builtin_delegates as _register_builtins
from nativert.backend.dynamo import (
    CompileOptions,
    CompileReport,
    compile_reports,
    last_compile_report,
)
from nativert.backend.executor import Executor
from nativert.backend.package import PackageError, load, save
from nativert.backend.to_backend import to_backend
from nativert.call_delegate import call_delegate, delegate_nodes, lowered_modules
from nativert.errors import (
    DelegateCallError,
    DelegateCompileError,
    DelegateUnavailableError,
    LoweringError,
    NativertError,
    PartitionError,
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
    SupportTable,
    delegation_report,
)
from nativert.passes import PassResult

_register_builtins()

__version__ = "0.1.0"

__all__ = [
    "AllNodePartitioner",
    "Availability",
    "CapabilityPartitioner",
    "CompileOptions",
    "CompileReport",
    "CompileSpec",
    "Delegate",
    "DelegateCallError",
    "DelegateCompileError",
    "DelegateExecutor",
    "DelegateUnavailableError",
    "DelegationReport",
    "DelegationSpec",
    "Executor",
    "LoweredBackendModule",
    "LoweringError",
    "NativertError",
    "PartitionError",
    "PartitionResult",
    "Partitioner",
    "PackageError",
    "PassResult",
    "SupportTable",
    "UnknownDelegateError",
    "WeightsError",
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

"""`to_backend`: delegate parts of an ExportedProgram, or all of it, to real runtimes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, overload

from torch.export import ExportedProgram

from nativert._program import weight_names, weight_tensor
from nativert._program.ops import op_name
from nativert.backend.cache import payload_cache
from nativert.backend.examples import example_user_inputs
from nativert.backend.lowering import compile_segment
from nativert.backend.pipeline import PassList, decompose, lower_program
from nativert.backend.plan import RegionPlan, guard
from nativert.delegate import FP32, get_delegate, require_available
from nativert.errors import LoweringError, SettingsError
from nativert.lowered import LoweredBackendModule
from nativert.partitioner.base import DelegationSpec, Partitioner
from nativert.settings import Settings

# Settings that describe the default partitioner: with a partitioner of your own, set them on
# it instead.
_PARTITIONING = (
    "delegates",
    "min_block_size",
    "exclude_ops",
    "allow_single_node_ops",
    "compile_specs",
    "num_threads",
)


@overload
def to_backend(
    program: ExportedProgram,
    partitioner: Partitioner | None = None,
    *,
    passes: PassList | None = None,
    settings: Settings | None = None,
    **options: Any,
) -> ExportedProgram: ...


@overload
def to_backend(
    backend_id: str,
    program: ExportedProgram,
    *,
    compile_specs: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
    **options: Any,
) -> LoweredBackendModule: ...


def to_backend(first: Any, second: Any = None, **kwargs: Any) -> Any:
    """Delegate a program to backends.

    `to_backend(ep, partitioner=None, *, passes=None, settings=None, **options)` runs the one
    pipeline: decompose `ep` to functional core ATen (keeping whole the ops the partitioner's
    delegates prefer), run `passes` (None: nativert.passes.DEFAULT_PIPELINE; `[]`: none),
    partition (default: `CapabilityPartitioner.from_settings(settings)`, every node to the
    highest-priority available delegate that supports it) and lower. It returns an
    ExportedProgram whose regions run through `call_delegate`; `ep` is not modified.

    `options` are `nativert.Settings` fields (`delegates`, `min_block_size`, `strict`,
    `cache_dir`, `progress`, ...), the same names `torch.compile(..., options=)` and
    `nativert lower` take; `settings` is a Settings object to start from.

    `to_backend("eager", ep, compile_specs={...})` lowers the whole program to one delegate
    and returns a LoweredBackendModule; calling it runs the program.

    Example::

        ep = torch.export.export(model, (x,))
        delegated = nativert.to_backend(ep, min_block_size=2)
        nativert.Executor(delegated)(x)
    """
    if isinstance(first, str):
        return _lower_whole(first, second, **kwargs)
    if isinstance(first, ExportedProgram):
        return _lower_partitioned(first, second, **kwargs)
    raise TypeError(
        "to_backend takes (ExportedProgram, partitioner=None) or (backend_id: str, "
        f"ExportedProgram), got ({type(first).__name__}, {type(second).__name__})"
    )


def _lower_partitioned(
    program: ExportedProgram,
    partitioner: Partitioner | None = None,
    *,
    passes: PassList | None = None,
    settings: Settings | None = None,
    **options: Any,
) -> ExportedProgram:
    settings = Settings.from_options(settings, **options)
    given = sorted(set(options) & set(_PARTITIONING))
    if partitioner is not None and given:
        raise SettingsError(
            f"settings {given} configure the default partitioner, but a partitioner was "
            f"given ({type(partitioner).__name__}); set them on it instead"
        )
    return lower_program(program, settings, partitioner=partitioner, passes=passes).program


def _lower_whole(
    backend_id: str,
    program: ExportedProgram,
    *,
    compile_specs: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
    **options: Any,
) -> LoweredBackendModule:
    if not isinstance(program, ExportedProgram):
        raise TypeError(
            f"to_backend({backend_id!r}, program) needs an ExportedProgram, "
            f"got {type(program).__name__}"
        )
    delegate = get_delegate(backend_id)
    specs = {backend_id: dict(compile_specs or {})}
    settings = Settings.from_options(settings, **options).replace(compile_specs=specs)
    require_available(delegate)
    program = decompose(program, delegate.ops_to_preserve())
    unsupported = []
    for node in program.graph.nodes:
        if node.op == "call_function":
            reason = delegate.check_support(node)
            if reason is not None:
                unsupported.append(f"{node.name} ({op_name(node.target)}): {reason}")
    if unsupported:
        shown = "\n  ".join(unsupported[:10])
        more = f"\n  ... and {len(unsupported) - 10} more" if len(unsupported) > 10 else ""
        raise LoweringError(
            f"delegate {backend_id!r} cannot run the whole program; unsupported nodes:\n  "
            f"{shown}{more}\nuse to_backend(program, partitioner) to delegate only what it "
            "supports"
        )
    spec = DelegationSpec(backend_id, settings.specs_for(delegate))
    tag, cache = f"{backend_id}_program", payload_cache(settings.cache_dir)
    plan = RegionPlan(spec)
    if plan.precision != FP32:  # the accuracy guard, as for a partitioned program
        args = [weight_tensor(program, name) for name in weight_names(program)]
        args += example_user_inputs(program, program.example_inputs)
        plan = guard(program, spec, tag, args, settings.accuracy, cache=cache, owns_weights=True)
    lowered = compile_segment(
        program, plan.spec, tag, owns_weights=True, cache=cache, payload=plan.payload
    )
    lowered.accuracy = plan.accuracy
    return lowered

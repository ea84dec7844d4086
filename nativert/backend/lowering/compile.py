"""Compiling a segment: its delegate's preprocess (or the payload cache), the payload wrapped
in a LoweredBackendModule, and the runtime's trial load (a payload it refuses is a compile
failure, found while the region can still stay in PyTorch)."""

from __future__ import annotations

from collections.abc import Sequence

from torch.export import ExportedProgram

from nativert._program import weight_names, weight_tensor
from nativert._program.ops import op_name
from nativert.backend.cache import PayloadCache, segment_key
from nativert.delegate import get_delegate, require_available
from nativert.errors import DelegateCompileError, DelegateLoadError, first_line
from nativert.lowered import LoweredBackendModule
from nativert.partitioner.base import DelegationSpec


def compile_segment(
    segment: ExportedProgram,
    spec: DelegationSpec,
    tag: str,
    *,
    owns_weights: bool = False,
    mutated_arg_indices: Sequence[int] = (),
    state_arg_indices: Sequence[int] = (),
    cache: PayloadCache | None = None,
    payload: bytes | None = None,
) -> LoweredBackendModule:
    """Run the delegate's preprocess on `segment` and wrap the payload in a lowered module.

    With a `cache`, a payload compiled before for the same segment, specs and versions is
    reused instead of compiling again, for delegates that declare `cacheable = True` (their
    payloads depend only on what the key covers: never on weight values). A `payload`
    compiled earlier for this very segment (autotune's) is used as it is."""
    if payload is not None:
        return _lowered(
            segment, spec, tag, payload, owns_weights, mutated_arg_indices, state_arg_indices
        )
    delegate = get_delegate(spec.backend_id)
    require_available(delegate)
    names = weight_names(segment)
    try:  # weight values a cached payload would not see
        delegate.check_weights({n: weight_tensor(segment, n) for n in names})
    except ValueError as exc:
        raise DelegateCompileError(
            f"delegate {spec.backend_id!r} cannot run segment {tag!r} "
            f"({ops_summary(segment)}) with its weights: {exc}"
        ) from exc
    key = None
    specs = {s.key: s.value for s in spec.compile_specs}
    if not delegate.cacheable or delegate.weights_in_payload(specs):
        cache = None  # its payload may depend on more than the key (e.g. weight values)
    if cache is not None:
        versions = {"delegate": delegate.version, **delegate.toolchain()}
        key = segment_key(segment, spec.backend_id, versions, spec.compile_specs)
        payload = cache.get(key)
        if payload is not None:
            return _lowered(
                segment, spec, tag, payload, owns_weights, mutated_arg_indices, state_arg_indices
            )
    try:
        payload = delegate.preprocess(segment, list(spec.compile_specs))
    except Exception as exc:
        detail = first_line(exc) if isinstance(exc, DelegateCompileError) else _detail(exc)
        raise DelegateCompileError(
            f"delegate {spec.backend_id!r} failed to compile segment {tag!r} "
            f"({ops_summary(segment)}): {detail}"
        ) from exc
    lowered = _lowered(
        segment, spec, tag, payload, owns_weights, mutated_arg_indices, state_arg_indices
    )
    _check_loads(lowered, segment)
    if cache is not None:
        cache.put(key, payload)  # only payloads the runtime accepted
    return lowered


def _detail(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"


def ops_summary(segment: ExportedProgram, shown: int = 4) -> str:
    nodes = [n for n in segment.graph.nodes if n.op == "call_function"]
    ops = sorted({op_name(n.target) for n in nodes})
    more = f" and {len(ops) - shown} more" if len(ops) > shown else ""
    return f"{len(nodes)} nodes: {', '.join(ops[:shown])}{more}"


def _check_loads(lowered: LoweredBackendModule, segment: ExportedProgram) -> None:
    """Build the module's executor now, bound to the segment's weights (`.module()` and
    dense calls then use it): a payload its runtime refuses (ONNX Runtime's shape inference,
    a library that does not load) is a compile failure, found while the region can still
    stay in PyTorch, and never cached."""
    try:
        lowered.executor  # noqa: B018  (builds it)
    except Exception as exc:
        raise DelegateCompileError(
            f"delegate {lowered.backend_id!r} compiled segment {lowered.module_name!r} "
            f"({ops_summary(segment)}), but its runtime refused the result: "
            + (first_line(exc) if isinstance(exc, DelegateLoadError) else _detail(exc))
        ) from exc


def _lowered(segment, spec, tag, payload, owns_weights, mutated_arg_indices, state_arg_indices):
    return LoweredBackendModule(
        backend_id=spec.backend_id,
        processed_bytes=payload,
        compile_specs=list(spec.compile_specs),
        original_module=segment,
        module_name=tag,
        owns_weights=owns_weights,
        mutated_arg_indices=mutated_arg_indices,
        state_arg_indices=state_arg_indices,
    )

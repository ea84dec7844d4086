"""Hybrid specs: what a delegate needs when other code runs between its calls (PyTorch nodes
or other regions): its `hybrid_compile_specs`, unless the settings set the key."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from nativert._program.meta import TAG_KEY
from nativert._program.ops import is_compute, produces_tensors
from nativert.delegate import dict_to_specs, get_delegate
from nativert.partitioner.base import DelegationSpec, PartitionResult
from nativert.settings import Settings


def with_hybrid_specs(
    spec: DelegationSpec, given: Mapping[str, object] | None = None
) -> DelegationSpec:
    """`spec` plus its delegate's `hybrid_compile_specs` for keys neither it nor `given` (the
    settings' compile specs for that delegate) sets."""
    specs = {s.key: s.value for s in spec.compile_specs}
    extra = get_delegate(spec.backend_id).hybrid_compile_specs
    given = given or {}
    missing = {k: v for k, v in extra.items() if k not in specs and k not in given}
    if not missing:
        return spec
    return dataclasses.replace(spec, compile_specs=tuple(dict_to_specs({**specs, **missing})))


def hybrid_specs(result: PartitionResult, settings: Settings) -> PartitionResult:
    """Add each delegate's `hybrid_compile_specs` when the program runs more than one region
    or leaves compute in PyTorch (keys the settings set win)."""
    tags = result.tags
    program = result.tagged_program
    kept = any(
        n.op == "call_function" and TAG_KEY not in n.meta and is_compute(n) and produces_tensors(n)
        for n in program.graph.nodes
    )
    if len(tags) < 2 and not kept:
        return result
    new = {
        tag: with_hybrid_specs(spec, settings.compile_specs.get(spec.backend_id, {}))
        for tag, spec in tags.items()
    }
    return PartitionResult(program, new)


def embedded_settings(settings: Settings) -> Settings:
    """`settings` with every candidate delegate's `hybrid_compile_specs` (keys the settings
    set win), for graphs that always run between PyTorch code: the forward and backward
    graphs of training, where the loss, the autograd engine and the optimizer run between
    calls. Measured (benchmarks/train.py, MLP step, 2 cores): ONNX Runtime's threads spinning
    after each call took the cores PyTorch's OpenMP threads needed next; a 64x10 log_softmax
    took 2.5 ms instead of 45 us and the step 34 ms instead of 11 ms."""
    from nativert.delegate.registry import list_delegates

    ids = settings.delegates or list_delegates(available_only=True)
    specs = {k: dict(v) for k, v in settings.compile_specs.items()}
    for backend_id in ids:
        extra = get_delegate(backend_id).hybrid_compile_specs
        if extra:
            specs[backend_id] = {**extra, **specs.get(backend_id, {})}
    return settings.replace(compile_specs=specs)

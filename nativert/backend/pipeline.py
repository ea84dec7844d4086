"""The one pipeline: decompose -> passes -> partition -> lower (-> passes on the result).

`to_backend`, the torch.compile backend and `nativert lower` all run `lower_program`; they
differ only in what they hand it (the settings, a partitioner, the pass lists) and where
the program comes from. Stages:

1. decompose: a program in training IR (what torch.export returns) becomes functional core
   ATen, keeping whole the ops the partitioner's delegates ask to preserve. A program already
   decomposed (the ATEN dialect: you ran `decompose_to_core_aten` or `run_decompositions`
   yourself, e.g. before your own passes) is taken as it is, so what earlier passes recorded
   in it survives. torch.compile's graphs arrive decomposed: aot_autograd traced them with the
   same table, `nativert.passes.decomposition_table`.
2. passes: `passes` (default DEFAULT_PIPELINE; `[]` runs none).
3. partition: the partitioner tags a copy of the program (never the caller's graph); its
   result is checked before anything reads it.
4. lower: each tagged region becomes a LoweredBackendModule called through call_delegate
   (`lowering.lower_tagged_program`), as the lowering plan says (`plan.py`: regions that
   compute below fp32 are checked against fp32 PyTorch first, the accuracy guard); compiled
   payloads come from and go to the on-disk cache. With `settings.autotune`, partitioning
   considers every available delegate and each region's runner (delegate x precision) is
   chosen by measurement (`autotune.py`).
5. after lowering: `after_lowering` passes on the lowered program (torch.compile's).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch.export import ExportedProgram

from nativert._program import copy_graph_module, rebuild_program
from nativert._quiet import quiet
from nativert.backend.autotune import (
    TuningReport,
    candidate_settings,
    compare_with_pytorch,
    plain_copy,
    tune_and_lower,
)
from nativert.backend.cache import payload_cache
from nativert.backend.lowering import hybrid_specs, lower_tagged_program
from nativert.backend.plan import RegionPlan, guarded_plan, in_fp32
from nativert.errors import DelegateCompileError, PartitionError
from nativert.partitioner.base import DelegationSpec, Partitioner, PartitionResult
from nativert.partitioner.capability import CapabilityPartitioner
from nativert.passes import DEFAULT_PIPELINE, decompose_to_core_aten, run_passes
from nativert.passes.manager import Pass
from nativert.settings import Settings

logger = logging.getLogger("nativert")
PassList = Sequence[Pass | tuple[str, Pass]]


@dataclasses.dataclass(frozen=True)
class LoweringResult:
    """A lowered program and what lowering it took."""

    program: ExportedProgram
    fallbacks: tuple[str, ...]  # why each region that stayed in PyTorch failed to compile
    cache_hits: int
    cache_misses: int
    seconds: float
    tuning: TuningReport | None = None  # what autotune measured, when it ran


def fallback_message(exc: DelegateCompileError) -> str:
    return f"{exc} (strict=True raises instead)"


def check_partitioner(partitioner: Any) -> Partitioner:
    """The partitioner, or a TypeError that says what a partitioner is."""
    if isinstance(partitioner, str):  # str has no .partition, but say what was meant
        raise TypeError(
            f"to_backend(program, {partitioner!r}): the second argument is a partitioner. "
            f"To lower the whole program to one delegate write to_backend({partitioner!r}, "
            f"program); to delegate what it supports use AllNodePartitioner({partitioner!r})"
        )
    if not isinstance(partitioner, Partitioner):
        missing = [m for m in ("partition", "ops_to_preserve") if not hasattr(partitioner, m)]
        raise TypeError(
            f"a partitioner needs partition(program) and ops_to_preserve() methods; "
            f"{type(partitioner).__name__} lacks {missing}"
        )
    return partitioner


def decompose(program: ExportedProgram, preserve: frozenset) -> ExportedProgram:
    """Stage 1: functional core ATen, keeping `preserve` ops whole (a program that is
    decomposed already is returned as it is)."""
    if is_decomposed(program):
        return program
    return decompose_to_core_aten(program, preserve=preserve).program


def is_decomposed(program: ExportedProgram) -> bool:
    """Functional ATen already (run_decompositions' output), not training IR."""
    return program.verifiers[0].dialect == "ATEN"


def lower_program(
    program: ExportedProgram,
    settings: Settings,
    *,
    partitioner: Partitioner | None = None,
    passes: PassList | None = None,
    after_lowering: PassList = (),
    on_fallback: Callable[[DelegateCompileError], None] | None = None,
) -> LoweringResult:
    """Run the pipeline (see the module docstring) on `program`, which is not modified.

    `partitioner`: default `CapabilityPartitioner.from_settings(settings)`.
    `on_fallback(error)` is called for each region that fails to compile and stays in
    PyTorch (default: a WARNING on the `nativert` logger); under `settings.strict` the error
    is raised instead.
    """
    with quiet():
        return _lower_program(program, settings, partitioner, passes, after_lowering, on_fallback)


def _lower_program(program, settings, partitioner, passes, after_lowering, on_fallback):
    start = time.perf_counter()
    # A partitioner of the caller's is honoured as it is; the default's plan is checked.
    default_partitioner = partitioner is None
    if partitioner is None:
        base = candidate_settings(settings) if settings.autotune else settings
        partitioner = CapabilityPartitioner.from_settings(base)
    check_partitioner(partitioner)
    example_inputs = program.example_inputs
    program = decompose(program, frozenset(partitioner.ops_to_preserve()))
    program = run_passes(program, DEFAULT_PIPELINE if passes is None else passes).program
    # Partitioners tag, and lowering rewrites, a copy: never the caller's graph.
    program = rebuild_program(program, copy_graph_module(program))
    result = hybrid_specs(_partition(partitioner, program), settings)

    cache = payload_cache(settings.cache_dir)
    fallbacks: list[str] = []

    def fallback(exc: DelegateCompileError) -> None:
        fallbacks.append(str(exc))
        if on_fallback is not None:
            on_fallback(exc)
        else:
            logger.warning("%s", fallback_message(exc))

    common = dict(
        strict=settings.strict,
        cache=cache,
        on_fallback=fallback,
        alternatives=alternatives(partitioner),
        min_block_size=settings.min_block_size,
    )
    tuning = None
    if settings.autotune and result.tags:
        lower = functools.partial(lower_tagged_program, **common)
        lowered, tuning = tune_and_lower(
            result, settings, cache=cache, example_inputs=example_inputs, lower=lower
        )
    else:
        compare = default_partitioner and settings.compare_with_pytorch and bool(result.tags)
        # Lowering rewrites the tagged program in place: the comparison needs it as it was.
        tagged = plain_copy(result.tagged_program) if compare else None
        plan = guarded_plan(result, settings, example_inputs=example_inputs, cache=cache)
        lowered = _lower(result.tagged_program, plan, settings.show_progress, common)
        if compare:
            lower = functools.partial(lower_tagged_program, **common)
            started = time.perf_counter()
            lowered, decision = compare_with_pytorch(lowered, tagged, example_inputs, lower)
            if decision is not None:
                seconds = time.perf_counter() - started
                tuning = TuningReport([decision], seconds, by="compare_with_pytorch")
    if after_lowering:
        lowered = run_passes(lowered, after_lowering).program
    return LoweringResult(
        program=lowered,
        fallbacks=tuple(fallbacks),
        cache_hits=cache.stats.hits if cache else 0,
        cache_misses=cache.stats.misses if cache else 0,
        seconds=time.perf_counter() - start,
        tuning=tuning,
    )


def alternatives(partitioner: Partitioner) -> tuple[DelegationSpec, ...]:
    """The delegates a node that breaks its region's compile is offered to, in priority
    order, in fp32: those a CapabilityPartitioner assigns to (a custom partitioner's choice
    is kept)."""
    if not isinstance(partitioner, CapabilityPartitioner):
        return ()
    settings = partitioner.settings
    # fp32: a piece salvaged onto another delegate is not checked by the accuracy guard.
    return tuple(
        in_fp32(DelegationSpec(d.backend_id, settings.specs_for(d)))
        for d in partitioner.candidates()
    )


def _lower(
    program: ExportedProgram, plan: Mapping[str, RegionPlan], progress: bool, common: dict
) -> ExportedProgram:
    if not progress or not plan:
        return lower_tagged_program(program, plan, **common)
    from tqdm import tqdm

    with tqdm(total=len(plan), desc="compiling partitions", unit="region") as bar:

        def advance(tag: str, spec: DelegationSpec) -> None:
            bar.set_postfix_str(f"{tag} ({spec.backend_id})")
            bar.update(1)

        return lower_tagged_program(program, plan, on_region=advance, **common)


def _fingerprint(program: ExportedProgram) -> list[tuple[str, str, str]]:
    return [(n.name, n.op, str(n.target)) for n in program.graph.nodes]


def _partition(partitioner: Partitioner, program: ExportedProgram) -> PartitionResult:
    """Stage 3, with the partitioner's result checked before anything reads it."""
    name = type(partitioner).__name__
    before = _fingerprint(program)
    result = partitioner.partition(program)
    if not isinstance(result, PartitionResult):
        raise PartitionError(
            f"partitioner {name}.partition() returned {type(result).__name__}; it must "
            "return nativert.PartitionResult(tagged_program, {tag: DelegationSpec})"
        )
    if not isinstance(result.tags, Mapping):
        raise PartitionError(
            f"partitioner {name} returned tags of type {type(result.tags).__name__}; "
            "PartitionResult.tags must map each tag to a DelegationSpec"
        )
    for tag, spec in result.tags.items():
        if not isinstance(spec, DelegationSpec):
            raise PartitionError(
                f"partitioner {name} gave tag {tag!r} the spec {spec!r}; each tag needs a "
                "nativert.DelegationSpec(backend_id, compile_specs)"
            )
    tagged = result.tagged_program
    if tagged is not program or _fingerprint(tagged) != before:
        raise PartitionError(
            f"partitioner {name} changed the program; partitioners may only set "
            "node.meta['delegation_tag'] on the program they are given"
        )
    return result

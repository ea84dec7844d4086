"""The lowering plan: per region, exactly what lowering compiles, decided before it runs.

A partition result says which delegate takes each region. Before lowering, its spec may
still change: hybrid specs (lowering.hybrid_specs), the accuracy guard (below) and autotune
(autotune.py) each decide something per region. What they decide is handed to lowering as
one frozen `RegionPlan` per tag; lowering consumes it once and decides nothing itself
(except salvaging a region that fails to compile).

The accuracy guard: every region whose spec asks for a precision below fp32 is compiled
now, run on its real arguments (from one run of the program on its example inputs, else on
synthesized ones) and compared with the same region in fp32 PyTorch. Within
`Settings.accuracy` it keeps that precision (the compiled payload goes to lowering as it
is); over it, the region is planned in fp32 instead and one warning names it and its error.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.export import ExportedProgram

from nativert._program.accuracy import Accuracy, measure_accuracy
from nativert.backend.cache import PayloadCache
from nativert.backend.examples import example_user_inputs, node_values, region_args
from nativert.delegate import FP32, PRECISION_SPEC, spec_precision
from nativert.errors import DelegateCompileError, first_line
from nativert.partitioner.base import DelegationSpec, PartitionResult
from nativert.settings import Settings

logger = logging.getLogger("nativert")


@dataclasses.dataclass(frozen=True)
class RegionPlan:
    """How lowering compiles one region.

    spec: the delegate and its compile specs (hybrid specs and precision applied).
    payload: compiled already for this very segment and spec (autotune's winner, the
        guard's checked payload): used as it is.
    note: one line for the delegation report (what autotune or the guard measured).
    accuracy: the region's measured error, when it computes below fp32.
    """

    spec: DelegationSpec
    payload: bytes | None = None
    note: str = ""
    accuracy: Accuracy | None = None

    @property
    def precision(self) -> str:
        return spec_precision(self.spec.compile_specs)


def as_plan(tags: Mapping[str, DelegationSpec | RegionPlan]) -> dict[str, RegionPlan]:
    """The trivial plan of a partition result's tags (plans given are kept)."""
    return {
        tag: spec if isinstance(spec, RegionPlan) else RegionPlan(spec)
        for tag, spec in tags.items()
    }


def in_fp32(spec: DelegationSpec) -> DelegationSpec:
    """`spec` without its precision compile spec: the delegate computes in fp32."""
    specs = tuple(s for s in spec.compile_specs if s.key != PRECISION_SPEC)
    return dataclasses.replace(spec, compile_specs=specs)


def run_lowered(lowered: Any, args: Sequence[Any]) -> Callable[[], Any]:
    """A call that runs a new executor of `lowered`, bound to the weights in `args`
    (weights first), on the rest of `args`."""
    executor = lowered.load_executor()
    count = lowered.num_weights
    executor.init_weights(dict(zip(lowered.weight_names, args[:count], strict=True)))
    state, inputs = executor.active_state(), list(args[count:])
    return lambda: executor.run_with(state, inputs)


def guard(
    segment: ExportedProgram,
    spec: DelegationSpec,
    tag: str,
    args: Sequence[Any],
    budget: float,
    *,
    cache: PayloadCache | None,
    **compile_kw: Any,
) -> RegionPlan:
    """The plan of a region whose spec asks for a precision below fp32 (see the module
    docstring). A region that fails to compile at that precision is planned in fp32 (and
    salvaged by lowering if that fails too): nothing below fp32 goes unchecked."""
    from nativert.backend.lowering import compile_segment

    precision = spec_precision(spec.compile_specs)
    try:
        lowered = compile_segment(segment, spec, tag, cache=cache, **compile_kw)
        run = run_lowered(lowered, args)
        with torch.no_grad():
            got, expected = run(), segment.graph_module(*args)  # expected: fp32 PyTorch
        accuracy = measure_accuracy(got, expected)
    except DelegateCompileError as exc:  # fp32 it is; lowering salvages it if that fails too
        return _fallback(tag, spec, f"{precision} failed to compile ({first_line(exc)[:200]})")
    except Exception as exc:  # it compiled but cannot run or answers wrongly: fp32
        why = f"{precision} failed on the example inputs ({type(exc).__name__}: "
        why += f"{first_line(exc)[:200]})"
        return _fallback(tag, spec, why)
    if accuracy.max_rel <= budget:  # the report shows the precision and its error
        return RegionPlan(spec, lowered.processed_bytes, accuracy=accuracy)
    return _fallback(tag, spec, f"{precision} {accuracy.text()}, over accuracy={budget:g}")


def _fallback(tag: str, spec: DelegationSpec, why: str) -> RegionPlan:
    logger.warning("region %r (%s) is lowered in fp32: %s", tag, spec.backend_id, why)
    return RegionPlan(in_fp32(spec), note=f"accuracy guard: fp32, since {why}")


def guarded_plan(
    result: PartitionResult,
    settings: Settings,
    *,
    example_inputs: Any,
    cache: PayloadCache | None,
) -> dict[str, RegionPlan]:
    """The plan of a partition result: trivial for fp32 regions, guarded for the others."""
    from nativert.backend.lowering import region_segments

    plan = as_plan(result.tags)
    low = [tag for tag, p in plan.items() if p.precision != FP32]
    if not low:
        return plan
    program = result.tagged_program
    try:
        values = node_values(program, example_user_inputs(program, example_inputs))
    except Exception as exc:  # nothing to measure on: nothing goes below fp32 unchecked
        why = f"the program does not run on its example inputs ({type(exc).__name__}: "
        why += f"{first_line(exc)[:200]})"
        return {tag: _fallback(tag, p.spec, why) if tag in low else p for tag, p in plan.items()}
    for tag, (segment, names) in region_segments(program, result.tags, only=low).items():
        args = region_args(values, names)
        plan[tag] = guard(segment, plan[tag].spec, tag, args, settings.accuracy, cache=cache)
    return plan

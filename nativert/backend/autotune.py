"""Autotune: choose each region's runner by measuring it (`Settings.autotune`).

Lowering normally sends a node to the highest-priority delegate that supports it. With
autotune, the pipeline instead:

1. partitions with every available delegate as a candidate (opt-in ones such as aoti and
   openvino included, unless `delegates` names some), so each region has a default runner;
2. runs the program once on its example inputs (`ExportedProgram.example_inputs`, else
   synthesized from the placeholders' shapes) to get every region's real inputs;
3. per region: compiles it on every candidate delegate that supports all of its nodes, checks
   each one's outputs against PyTorch's, and times them and "keep in PyTorch" interleaved
   (rounds in shuffled order, after the runtime's threads settle, medians);
4. per program: when some delegate takes every node, the whole program on that delegate is
   timed against the mixed plan of step 3, end to end on an Executor, and the faster wins.

Every measurement goes into the delegation report ("onnxruntime 0.41 ms, aoti 0.52 ms,
pytorch 0.60 ms -> onnxruntime"). Decisions are cached as small JSON files under
`<cache_dir>/autotune/`, keyed by the segment (code, shapes, signature), its input shapes, the
candidates and their versions and compile specs, and the machine (CPU model, CPU count,
torch threads): a second lowering compiles only the winners (from the payload cache). The
whole search stops at `autotune_budget_s`; regions not reached keep their default runner, and
decisions made then are not cached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from nativert._program import copy_graph_module, rebuild_program
from nativert._program.accuracy import Accuracy, measure_accuracy
from nativert._program.meta import NOTE_KEY, REASON_KEY, TAG_KEY
from nativert._program.ops import is_compute, produces_tensors
from nativert._program.quant import INT8, is_quantized
from nativert.backend.cache import PayloadCache, cache_root, segment_key
from nativert.backend.examples import example_user_inputs, node_values, region_args
from nativert.backend.lowering import compile_segment, hybrid_specs, region_segments
from nativert.backend.plan import RegionPlan, in_fp32, run_lowered
from nativert.delegate import FP32, Delegate, get_delegate, spec_precision
from nativert.errors import DelegateCompileError, first_line
from nativert.partitioner.base import DelegationSpec, PartitionResult
from nativert.settings import Settings

logger = logging.getLogger("nativert")

PYTORCH = "pytorch"
MIXED = "mixed"
# 2: whole-program plans are checked against PyTorch before they win; 3: runners are
# (delegate, precision), keys name the CPU's matrix/vector extensions.
_FORMAT = 3
_ISA_PREFIXES = ("avx", "amx", "fma", "f16c")
_ROUNDS = 5
_ROUND_S = 0.01  # each candidate runs about this long per round
_SETTLE_S = 0.02  # pause before each candidate: other runtimes' threads stop spinning
_RTOL = 1e-3  # a candidate whose outputs differ more from PyTorch's is not chosen


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One candidate's median time in ms, or why it could not run."""

    runner: str
    ms: float | None
    failure: str | None = None

    def text(self) -> str:
        if self.ms is None:
            return f"{self.runner} failed ({self.failure})"
        return f"{self.runner} {self.ms:.3f} ms"


@dataclasses.dataclass(frozen=True)
class Decision:
    """What autotune chose for one region (or, with tag "program", for the whole program)."""

    tag: str
    choice: str
    measurements: tuple[Measurement, ...]
    cached: bool = False

    def line(self) -> str:
        found = ", ".join(m.text() for m in self.measurements)
        return f"{found} -> {self.choice}" + (" (cached decision)" if self.cached else "")


@dataclasses.dataclass
class TuningReport:
    """Every decision autotune made, the time it took, and whether the budget ran out.
    `by`: what decided ("Autotune", or "compare_with_pytorch" for the default plan's check)."""

    decisions: list[Decision] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    budget_spent: bool = False
    by: str = "Autotune"

    def __str__(self) -> str:
        lines = [f"{self.by}: {len(self.decisions)} decision(s) in {self.seconds:.1f} s"]
        if self.budget_spent:
            lines[0] += " (budget spent: regions not reached keep their default runner)"
        lines += [f"  {d.tag}: {d.line()}" for d in self.decisions]
        return "\n".join(lines)


# -- candidates -----------------------------------------------------------------------------
def candidate_settings(settings: Settings) -> Settings:
    """The settings autotune partitions with: the named delegates, else every available
    non-reference delegate, opt-in ones included, in priority order."""
    if settings.delegates is not None:
        return settings
    from nativert.delegate.registry import list_delegates

    ids = [b for b in list_delegates(available_only=True) if not get_delegate(b).reference]
    return settings.replace(delegates=tuple(ids)) if ids else settings


@dataclasses.dataclass(frozen=True)
class Runner:
    """One candidate: a delegate at one precision ("openvino", "openvino@bf16")."""

    name: str
    spec: DelegationSpec
    # Runs quantize/dequantize nodes: even in fp32 a value on a rounding boundary may land
    # one quantization step away from PyTorch's, so its results are held to the accuracy
    # budget, not to fp32 rounding.
    quantized: bool = False

    @property
    def precision(self) -> str:
        return spec_precision(self.spec.compile_specs)


def runners_for(delegate: Delegate, settings: Settings, quantized: bool = False) -> list[Runner]:
    """The delegate in fp32 and, where it offers the precision setting's (int8 for a
    quantized region), in that too."""
    precision = INT8 if quantized else None
    spec = DelegationSpec(delegate.backend_id, settings.specs_for(delegate, precision))
    fp32 = Runner(delegate.backend_id, in_fp32(spec), quantized)
    if spec_precision(spec.compile_specs) == FP32:
        return [fp32]
    name = f"{delegate.backend_id}@{spec_precision(spec.compile_specs)}"
    return [fp32, Runner(name, spec, quantized)]


def _supports_all(delegate: Delegate, nodes: Sequence[Node]) -> bool:
    import operator

    return all(delegate.check_support(n) is None for n in nodes if n.target is not operator.getitem)


# -- timing ---------------------------------------------------------------------------------
def time_interleaved(
    cases: Mapping[str, Callable[[], Any]], *, no_grad: bool = True
) -> dict[str, float]:
    """Median ms per call of each case, over rounds run in shuffled order (under
    torch.no_grad unless `no_grad` is False)."""
    if len(cases) == 1:
        return {name: 0.0 for name in cases}
    rng = random.Random(0)
    runs = {}
    with torch.no_grad() if no_grad else contextlib.nullcontext():
        for name, fn in cases.items():
            fn()  # warm up: first-call allocations, lazy initialisation
            start = time.perf_counter()
            fn()
            single = max(time.perf_counter() - start, 1e-6)
            runs[name] = max(1, min(1000, int(_ROUND_S / single)))
        samples: dict[str, list[float]] = {name: [] for name in cases}
        order = list(cases)
        for _ in range(_ROUNDS):
            rng.shuffle(order)
            for name in order:
                fn, n = cases[name], runs[name]
                time.sleep(_SETTLE_S)
                fn()  # wakes this runtime's threads
                start = time.perf_counter()
                for _ in range(n):
                    fn()
                samples[name].append((time.perf_counter() - start) / n * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def _check(
    got: Any, expected: Any, precision: str, budget: float, quantized: bool = False
) -> Accuracy | None:
    """Raise DelegateCompileError when outputs computed at `precision` are not PyTorch's:
    beyond rounding at fp32, beyond `budget` (relative error) below it or for a quantized
    region; the measured accuracy below fp32."""
    if precision == FP32 and not quantized:
        mismatch = _close(got, expected)
        if mismatch is not None:
            raise DelegateCompileError(f"wrong results: {mismatch}")
        return None
    try:
        accuracy = measure_accuracy(got, expected)
    except ValueError as exc:
        raise DelegateCompileError(f"wrong results: {exc}") from None
    if not accuracy.max_rel <= budget:
        raise DelegateCompileError(f"{accuracy.text()}, over accuracy={budget:g}")
    return accuracy


def _close(got: Any, expected: Any) -> str | None:
    """None when `got` matches `expected` (outputs of one segment), else what differs."""
    if len(got) != len(expected):
        return f"{len(got)} outputs, expected {len(expected)}"
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if not isinstance(e, torch.Tensor):
            continue
        if not isinstance(g, torch.Tensor) or g.shape != e.shape or g.dtype != e.dtype:
            return f"output {i} is {getattr(g, 'shape', g)}, expected {e.dtype}{list(e.shape)}"
        if e.dtype.is_floating_point:
            scale = float(e.abs().max()) if e.numel() else 0.0
            err = float((g - e).abs().max()) if e.numel() else 0.0
            if not err <= _RTOL * (1.0 + scale):
                return f"output {i} differs from PyTorch's by {err:.3g}"
        elif not torch.equal(g, e):
            return f"output {i} differs from PyTorch's"
    return None


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)[:200]}"


# -- the decision cache ---------------------------------------------------------------------
@functools.cache
def machine() -> str:
    """The CPU model, count and the ISA extensions that pick kernels (AVX-512, its bf16 and
    fp16 forms, AMX): a decision taken on one machine is not another's."""
    model = None
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = sorted(
                    f for f in line.split(":", 1)[1].split() if f.startswith(_ISA_PREFIXES)
                )
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    return f"{model}; {os.cpu_count()} CPUs; {' '.join(flags)}"


class DecisionCache:
    """Decisions by key, one small JSON file each; unreadable entries are ignored."""

    def __init__(self, cache_dir: str | None) -> None:
        root = cache_root(cache_dir)
        self.directory = None if root is None else root / "autotune"

    def get(self, key: str, runners: Sequence[str]) -> Decision | None:
        if self.directory is None:
            return None
        try:
            data = json.loads((self.directory / f"{key}.json").read_text())
            if data.get("key") != key or data.get("choice") not in runners:
                return None
            measurements = tuple(
                Measurement(str(r), None if ms is None else float(ms), f)
                for r, ms, f in data["measurements"]
            )
            return Decision(str(data["tag"]), data["choice"], measurements, cached=True)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, decision: Decision) -> None:
        if self.directory is None:
            return
        data = {
            "format": _FORMAT,
            "key": key,
            "tag": decision.tag,
            "choice": decision.choice,
            "measurements": [[m.runner, m.ms, m.failure] for m in decision.measurements],
        }
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".{key}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.directory / f"{key}.json")
        except OSError as exc:
            logger.warning("nativert autotune: cannot write its cache (%s)", exc)


def value_text(value: Any, *, grad: bool = False) -> str:
    """An input as a decision key sees it: a tensor's dtype, shape, device (and, with
    `grad`, whether it requires grad); any other value's repr."""
    if isinstance(value, torch.Tensor):
        text = f"{value.dtype}{list(value.shape)}@{value.device.type}"
        return f"{text}:{value.requires_grad}" if grad else text
    return repr(value)


def digest(parts: Mapping[str, Any]) -> str:
    """A decision key: the sha256 of `parts` as sorted JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _key(code: str, inputs: Sequence[Any], runners: Sequence[Runner], settings) -> str:
    parts = {
        "format": _FORMAT,
        "code": code,
        "inputs": [value_text(v) for v in inputs],
        "candidates": {
            r.name: [_version(r.spec.backend_id), repr(r.spec.compile_specs)] for r in runners
        },
        # The precision allowed, and below fp32 the error allowed, decide the choice (also
        # for a program no delegate takes whole: its candidate list is empty).
        "precision": settings.precision,
        "accuracy": settings.accuracy if settings.precision != FP32 else None,
        "machine": machine(),
        "threads": torch.get_num_threads(),
    }
    return digest(parts)


def _version(backend_id: str) -> list[Any]:
    delegate = get_delegate(backend_id)
    return [delegate.version, delegate.toolchain()]


# -- the search -----------------------------------------------------------------------------
class _Tuner:
    def __init__(self, settings: Settings, cache: PayloadCache | None) -> None:
        self.settings = settings
        self.cache = cache
        self.decisions = DecisionCache(settings.cache_dir)
        self.report = TuningReport()
        self.start = time.perf_counter()

    def over_budget(self) -> bool:
        if time.perf_counter() - self.start > self.settings.autotune_budget_s:
            self.report.budget_spent = True
        return self.report.budget_spent

    def region(
        self,
        tag: str,
        segment: ExportedProgram,
        args: Sequence[Any],
        default: str,
        candidates: Sequence[Runner],
    ) -> tuple[Decision, dict[str, RegionPlan]]:
        """Measure one region on each candidate and PyTorch; the decision and, by runner
        name, the plans compiled for it."""
        names = [r.name for r in candidates] + [PYTORCH]
        key = _key(segment_key(segment, "autotune", {}, ()), args, candidates, self.settings)
        cached = self.decisions.get(key, names)
        if cached is not None:
            return dataclasses.replace(cached, tag=tag), {}
        reference = segment.graph_module
        with torch.no_grad():
            expected = reference(*args)
        cases: dict[str, Callable[[], Any]] = {PYTORCH: functools.partial(reference, *args)}
        failures: dict[str, str] = {}
        plans: dict[str, RegionPlan] = {}
        for runner in candidates:
            if runner.name != default and self.over_budget():
                failures[runner.name] = "not tried: autotune_budget_s spent"
                continue
            try:
                cases[runner.name], plans[runner.name] = self._compile(
                    segment, tag, runner, args, expected
                )
            except Exception as exc:  # any candidate may fail; the others still compete
                failures[runner.name] = _first_line(exc)
        times = time_interleaved(cases)
        measurements = tuple(Measurement(r, times.get(r), failures.get(r)) for r in names)
        choice = min(times, key=times.__getitem__)
        decision = Decision(tag, choice, measurements)
        if not self.report.budget_spent:
            self.decisions.put(key, decision)
        return decision, plans

    def _compile(self, segment, tag, runner: Runner, args, expected):
        lowered = compile_segment(segment, runner.spec, tag, cache=self.cache)
        run = run_lowered(lowered, args)
        with torch.no_grad():
            accuracy = _check(
                run(), expected, runner.precision, self.settings.accuracy, runner.quantized
            )
        if runner.precision == FP32:
            accuracy = None  # the report shows errors of regions below fp32
        return run, RegionPlan(runner.spec, lowered.processed_bytes, accuracy=accuracy)


def _region_nodes(program: ExportedProgram, tag: str) -> list[Node]:
    return [
        n for n in program.graph.nodes if n.op == "call_function" and n.meta.get(TAG_KEY) == tag
    ]


def plain_copy(program: ExportedProgram) -> ExportedProgram:
    return rebuild_program(program, copy_graph_module(program))


def _untagged(program: ExportedProgram) -> ExportedProgram:
    plan = plain_copy(program)
    for node in plan.graph.nodes:
        node.meta.pop(TAG_KEY, None)
    return plan


def _keep_in_pytorch(program: ExportedProgram, tag: str, why: str) -> None:
    for node in _region_nodes(program, tag):
        node.meta.pop(TAG_KEY, None)
        node.meta[REASON_KEY] = why


def tune_and_lower(
    result: PartitionResult,
    settings: Settings,
    *,
    cache: PayloadCache | None,
    example_inputs: Any,
    lower: Callable[..., ExportedProgram],
) -> tuple[ExportedProgram, TuningReport]:
    """Steps 2-4 of the module docstring on a partitioned program; the lowered program of
    the fastest plan and what was measured. `lower(program, tags, **kw)` lowers a tagged
    program (lower_tagged_program with the pipeline's cache and fallback handling)."""
    tuner = _Tuner(settings, cache)
    program = result.tagged_program
    flat = example_user_inputs(program, example_inputs)
    delegates = [get_delegate(b) for b in candidate_settings(settings).delegates or ()]
    compute = _tensor_compute(program)
    quantized = is_quantized(compute)
    whole = [
        r
        for d in delegates
        if compute and _supports_all(d, compute)
        for r in runners_for(d, settings, quantized)
    ]
    names = [MIXED, PYTORCH, *(r.name for r in whole)]
    key = _key(program.graph_module.code, flat, whole, settings)
    known = tuner.decisions.get(key, names)
    if known is not None and known.choice != MIXED:
        runner = next((r for r in whole if r.name == known.choice), None)
        plan = _whole_plan(program, runner, lower)
        chosen = _annotate(plan, known, tuner.report) if plan is not None else None
    else:
        chosen = None
    if chosen is None:
        mixed = _mixed_plan(tuner, result, flat, delegates, lower)
        chosen = _choose_plan(tuner, program, mixed, flat, whole, key, known, lower)
    tuner.report.seconds = time.perf_counter() - tuner.start
    logger.info("%s", tuner.report)
    return chosen, tuner.report


def _mixed_plan(tuner, result: PartitionResult, flat, delegates, lower) -> ExportedProgram:
    """Step 3: each region on its fastest runner."""
    settings, program = tuner.settings, result.tagged_program
    values = node_values(program, flat)
    plan = plain_copy(program)  # tags travel with the copied nodes
    chosen: dict[str, RegionPlan] = {}
    for tag, (segment, arg_names) in region_segments(program, result.tags).items():
        default = result.tags[tag].backend_id
        nodes = _region_nodes(program, tag)
        offered = [d for d in delegates if d.backend_id == default or _supports_all(d, nodes)]
        if default not in [d.backend_id for d in offered]:  # a custom partitioner's choice
            offered.insert(0, get_delegate(default))
        quantized = is_quantized(nodes)
        candidates = [r for d in offered for r in runners_for(d, settings, quantized)]
        args = region_args(values, arg_names)
        decision, compiled = tuner.region(tag, segment, args, default, candidates)
        tuner.report.decisions.append(decision)
        if decision.choice == PYTORCH:
            _keep_in_pytorch(plan, tag, f"autotune: {decision.line()}")
            continue
        runner = next(r for r in candidates if r.name == decision.choice)
        backend_id = runner.spec.backend_id
        new_tag = tag if runner.name == default else f"{backend_id}_{tag}"
        for node in _region_nodes(plan, tag):
            node.meta[TAG_KEY] = new_tag
        found = compiled.get(runner.name, RegionPlan(runner.spec))
        chosen[new_tag] = dataclasses.replace(found, note=f"autotune: {decision.line()}")
    specs = {tag: p.spec for tag, p in chosen.items()}
    specs = dict(hybrid_specs(PartitionResult(plan, specs), settings).tags)
    return lower(plan, {tag: dataclasses.replace(p, spec=specs[tag]) for tag, p in chosen.items()})


def _tensor_compute(program: ExportedProgram) -> list[Node]:
    """Nodes a partitioner would delegate: tensor-producing call_functions."""
    import operator

    from nativert.call_delegate import call_delegate

    return [
        node
        for node in program.graph.nodes
        if node.op == "call_function"
        and node.target not in (operator.getitem, call_delegate)
        and produces_tensors(node)
    ]


def _whole_plan(program, runner: Runner | None, lower) -> ExportedProgram | None:
    """The program with every tensor node on `runner` (None: PyTorch); None when that
    delegate cannot take it after all."""
    plan = _untagged(program)
    if runner is None:
        return lower(plan, {})
    tag = f"{runner.spec.backend_id}_program"
    for node in _tensor_compute(plan):
        node.meta[TAG_KEY] = tag
    try:
        return lower(plan, {tag: runner.spec}, strict=True)
    except Exception as exc:  # e.g. it supports every op but not this graph's structure
        logger.info("autotune: %s cannot take the whole program: %s", runner.name, _first_line(exc))
        return None


def _choose_plan(tuner, program, mixed, flat, whole, key, known, lower) -> ExportedProgram:
    """Step 4: the mixed plan against PyTorch alone and each delegate that takes the whole
    program, end to end on an Executor."""
    from nativert.call_delegate import lowered_modules

    if not _tensor_compute(mixed) and len(lowered_modules(mixed)) == 1:
        return mixed  # one region holds everything: step 3 compared every candidate
    if known is not None:  # MIXED, cached
        tuner.report.decisions.append(known)
        return mixed
    plans = {MIXED: mixed}
    if lowered_modules(mixed):  # else the mixed plan is PyTorch alone already
        plans[PYTORCH] = lower(_untagged(program), {})
    for runner in whole:
        if tuner.over_budget():
            break
        plan = _whole_plan(program, runner, lower)
        if plan is not None:
            plans[runner.name] = plan
    if len(plans) == 1:
        return mixed
    failures: dict[str, str] = {}
    cases = {}
    # Every plan must answer as PyTorch does (the mixed plan's regions were checked one by
    # one; a whole-program plan is checked here, end to end).
    reference = plans.get(PYTORCH, mixed)
    expected = None
    for name, plan in sorted(plans.items(), key=lambda item: item[1] is not reference):
        try:
            outputs, case = _plan_run(plan, flat)
            if expected is None:
                expected = outputs  # the reference plan's, which comes first
            else:
                _check(
                    outputs,
                    expected,
                    _plan_precision(plan),
                    tuner.settings.accuracy,
                    is_quantized(program.graph.nodes),
                )
            cases[name] = case
        except Exception as exc:  # a plan that cannot run loses; the mixed plan is a fallback
            failures[name] = _first_line(exc)
            if plan is reference:
                return mixed  # nothing to check the others against
    if not cases:
        return mixed
    times = time_interleaved(cases)
    names = [MIXED, PYTORCH, *(r.name for r in whole)]
    measurements = tuple(Measurement(r, times.get(r), failures.get(r)) for r in names if r in plans)
    decision = Decision("program", min(times, key=times.__getitem__), measurements)
    if not tuner.report.budget_spent:
        tuner.decisions.put(key, decision)
    return _annotate(plans[decision.choice], decision, tuner.report)


def _plan_run(plan: ExportedProgram, flat: Sequence[Any]) -> tuple[Any, Callable[[], Any]]:
    """One run of a lowered plan on an Executor, and the call that times it. Both use the
    plan's own copy of the inputs: a plan that mutates an input changes neither the caller's
    nor another plan's."""
    from nativert.backend.runtime import Executor

    executor = Executor(plan)
    own = [t.clone() if isinstance(t, torch.Tensor) else t for t in flat]
    with torch.no_grad():
        outputs = executor.run_flat(own)
    return outputs, functools.partial(executor.run_flat, own)


def _plan_precision(plan: ExportedProgram) -> str:
    """ "fp32" when every delegate of a lowered plan computes in fp32, else the lowest."""
    from nativert.call_delegate import lowered_modules

    low = [m.precision for m in lowered_modules(plan) if m.precision != FP32]
    return low[0] if low else FP32


def _annotate(plan: ExportedProgram, decision: Decision, report=None) -> ExportedProgram:
    """Record a program-level decision on the plan's nodes (for the delegation report)."""
    from nativert.call_delegate import call_delegate

    if report is not None:
        report.decisions.append(decision)
    if decision.choice == MIXED:
        return plan
    for node in plan.graph.nodes:
        if node.target is call_delegate:
            node.meta[NOTE_KEY] = f"autotune, whole program: {decision.line()}"
        elif decision.choice == PYTORCH and node.op == "call_function":
            node.meta[REASON_KEY] = f"autotune, whole program: {decision.line()}"
    return plan


# -- the default plan's check (Settings.compare_with_pytorch) -------------------------------
def is_hybrid(plan: ExportedProgram) -> bool:
    """Whether a lowered plan hands off between runtimes: compute (not views) left in
    PyTorch, or more than one delegate region."""
    from nativert.call_delegate import lowered_modules

    kept = any(is_compute(n) for n in _tensor_compute(plan))
    return kept or len(lowered_modules(plan)) > 1


def faster_plan(times: Mapping[str, float]) -> str:
    """The rule: the plan with the smallest median wins; on a tie the delegated one (MIXED)."""
    return min(times, key=lambda name: (times[name], name != MIXED))


def compare_with_pytorch(
    lowered: ExportedProgram, tagged: ExportedProgram, example_inputs: Any, lower
) -> tuple[ExportedProgram, Decision | None]:
    """Without autotune: a hybrid plan (`is_hybrid`) against the program in PyTorch alone,
    end to end on an Executor on the example inputs; the faster is kept (`faster_plan`) and
    the decision recorded on its nodes. Hand-offs between runtimes cost (threads waking,
    caches cold): a custom op between two small linears ran slower delegated than in
    PyTorch. A plan that is not hybrid, or that cannot be timed, is returned as it is, with
    no decision."""
    if not is_hybrid(lowered):
        return lowered, None
    try:
        chosen, decision = _compare(lowered, tagged, example_inputs, lower)
    except Exception as exc:  # the plan compiled and was checked region by region: keep it
        logger.info("nativert: the plan was not timed against PyTorch: %s", _first_line(exc))
        return lowered, None
    logger.info("nativert: %s", decision.line())
    return chosen, decision


def _compare(lowered, tagged, example_inputs, lower) -> tuple[ExportedProgram, Decision]:
    from nativert.call_delegate import call_delegate

    flat = example_user_inputs(tagged, example_inputs)
    plans = {MIXED: lowered, PYTORCH: lower(_untagged(tagged), {})}
    cases, outputs = {}, {}
    for name, plan in plans.items():
        outputs[name], cases[name] = _plan_run(plan, flat)
    mismatch = _close(outputs[MIXED], outputs[PYTORCH])
    if mismatch is not None and _plan_precision(lowered) == FP32:
        # The regions were checked as they compiled; say so rather than hide it.
        logger.warning("nativert: the lowered program differs from PyTorch's: %s", mismatch)
    times = time_interleaved(cases)
    decision = Decision(
        "program", faster_plan(times), tuple(Measurement(n, times[n]) for n in plans)
    )
    chosen = plans[decision.choice]
    note = f"compare_with_pytorch: {decision.line()}"
    for node in chosen.graph.nodes:
        if node.target is call_delegate:
            node.meta.setdefault(NOTE_KEY, note)
        elif decision.choice == PYTORCH and node.op == "call_function":
            node.meta.setdefault(REASON_KEY, note)  # a reason it had already stays
    return chosen, decision

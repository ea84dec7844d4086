"""`torch.compile(model, backend="nativert")`: Dynamo graphs through our delegates.

Dynamo hands the backend one FX graph per traced region (a graph break makes several).
aot_autograd turns each into functional core ATen with parameters lifted to inputs: one
*forward* and one *backward* graph when something requires grad, one *inference* graph
otherwise. aot_autograd decomposes with `nativert.passes.decomposition_table`, keeping whole
the ops the chosen delegates preserve (in inference graphs the composite ones too, such as
linear and scaled_dot_product_attention: `keeping_composite_ops_whole`), so an inference
graph reaches the partitioner as `to_backend` would hand it over. Each graph then goes
through the one pipeline (`backend/pipeline.py`: passes, partition, lower, with the on-disk
payload cache) and runs on an Executor. aot_autograd keeps the autograd bookkeeping (saved
activations, input mutations such as batch-norm running stats), so training works with both
graphs delegated.

Per call, an inference graph costs Dynamo's frame and guards (what every backend pays, from
~15 us for a small module to ~80 us for a transformers encoder, more with cold caches), a
check that the module's weights are still the ones the delegates own, and the Executor.
aot_autograd's runtime wrappers are skipped where they would do nothing
(`aot.wrappers_pass_through`); benchmarks/compile_backend.py measures all of it.

Settings come from `torch.compile(..., options={...})` (`nativert.Settings` fields). What
each compile did (regions, fallbacks, cache hits, time) is in `last_compile_report()`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import operator
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.fx import GraphModule

from nativert._program.quant import is_quantized
from nativert.backend.autotune import Decision, DecisionCache, candidate_settings
from nativert.backend.compile.aot import (
    module_weights,
    needs_grad,
    program_from_aten,
    unmutated_weights,
    wrappers_pass_through,
)
from nativert.backend.compile.choose import (
    INDUCTOR,
    NATIVERT,
    PYTORCH,
    GraphChoice,
    candidate_names,
    checker,
    choose,
    decision_key,
    draws_random_numbers,
    is_fake,
)
from nativert.backend.compile.report import CompileReport, GraphCompile, new_report
from nativert.backend.lowering import embedded_settings
from nativert.errors import DelegateCompileError, NativertError
from nativert.partitioner.capability import CapabilityPartitioner
from nativert.settings import Settings

logger = logging.getLogger("nativert")
_KINDS = {"fw": "forward", "bw": "backward", "inference": "inference"}
_warned: set[str] = set()


def nativert_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """The Dynamo backend registered as "nativert" (see the module docstring)."""
    if kwargs:
        raise NativertError(
            f"torch.compile(backend='nativert') got unexpected arguments {sorted(kwargs)}; "
            "pass settings as options={...}"
        )
    settings = Settings.from_options(options)
    report = new_report(settings)
    training = needs_grad(example_inputs)
    if not settings.compare_with_pytorch or is_fake(example_inputs):
        return _delegated(gm, example_inputs, settings, report, training)
    names = candidate_names(training, settings.autotune)
    # Under autotune, choices are cached like autotune's own: a later process compiles only
    # the winner.
    cache = DecisionCache(settings.cache_dir) if settings.autotune else None
    key = decision_key(gm, example_inputs, names, settings) if cache is not None else None
    known = cache.get(key, names) if cache is not None else None
    builders = {
        PYTORCH: lambda: gm.forward,
        NATIVERT: lambda: _delegated(gm, example_inputs, settings, report, training),
        INDUCTOR: lambda: _inductor(gm, example_inputs),
    }
    if known is not None:
        try:
            chosen = builders[known.choice]()
        except Exception as exc:  # e.g. inductor cannot compile here now: measure again
            logger.warning("nativert: the cached choice %s failed (%s)", known.choice, exc)
        else:
            report.choice = GraphChoice(known.choice, known.measurements, training, cached=True)
            return chosen
    candidates = {name: builders[name]() for name in names if name != INDUCTOR}
    if INDUCTOR in names:  # a compile that fails is reported as that candidate's failure
        candidates[INDUCTOR] = _or_failure(builders[INDUCTOR])
    random = draws_random_numbers(gm)  # its runs differ by design: not compared
    quantized = is_quantized(gm.graph.nodes)  # int8 regions differ by a quantization step
    check = None if random else checker(settings.precision, settings.accuracy, quantized)
    remember = None if cache is None else functools.partial(_remember, cache, key)
    return _Measured(candidates, report, training, check, remember)


def _remember(cache: DecisionCache, key: str, choice: GraphChoice) -> None:
    cache.put(key, Decision("graph", choice.choice, choice.measurements))


class _Measured:
    """Runs the candidate measured fastest on the first call's arguments (choose.py).

    The measurement waits for the first call, not the compile: a training run compiles the
    backward graph, which must happen outside Dynamo's compile (as it does normally, at the
    first backward)."""

    def __init__(
        self,
        candidates: dict,
        report: CompileReport,
        training: bool,
        check: Any,
        remember: Callable[[GraphChoice], None] | None = None,
    ):
        self.candidates, self.report = candidates, report
        self.training, self.check, self.remember = training, check, remember
        self.lock = threading.Lock()
        self.fn: Callable[..., Any] = self._first

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def _first(self, *args: Any) -> Any:
        with self.lock:
            if self.fn == self._first:  # not chosen meanwhile by another thread
                choice = choose(self.candidates, args, training=self.training, check=self.check)
                self.report.choice = choice
                # A choice made with a candidate failing is not kept: it may be passing.
                complete = all(m.ms is not None for m in choice.measurements)
                if self.remember is not None and complete:
                    self.remember(choice)
                graph_id = self.report.graph_id
                logger.info("nativert torch.compile graph %d %s", graph_id, choice.line())
                self.fn = self.candidates[choice.choice]
                self.candidates = {}  # the others' payloads and weights go
        return self.fn(*args)


def _inductor(gm: GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """Inductor's compile of the graph (autotune's third candidate when training)."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(copy.deepcopy(gm), list(example_inputs))


def _or_failure(build: Callable[[], Callable[..., Any]]) -> Callable[..., Any]:
    """`build()`, or, when building fails, a callable that raises its error: choose() then
    reports that candidate as failed."""
    try:
        return build()
    except Exception as exc:
        error = exc

        def failed(*args: Any) -> Any:
            raise error

        return failed


def _delegated(
    gm: GraphModule,
    example_inputs: Sequence[Any],
    settings: Settings,
    report: CompileReport,
    training: bool,
) -> Callable[..., Any]:
    """The graph through aot_autograd, each of its graphs lowered by the pipeline."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from nativert.passes import decomposition_table, keeping_composite_ops_whole

    # Training graphs always run between PyTorch code (loss, autograd engine, optimizer):
    # delegates get the specs they need to share the cores.
    embedded = embedded_settings(settings) if training else settings

    def partitioner_for(kind_settings: Settings) -> CapabilityPartitioner:
        # Autotune partitions with every available delegate as a candidate (autotune.py).
        base = candidate_settings(kind_settings) if settings.autotune else kind_settings
        return CapabilityPartitioner.from_settings(base)

    inference = partitioner_for(settings)
    trains = partitioner_for(embedded) if training else inference
    per_kind = {"inference": settings, "fw": embedded, "bw": embedded}
    partitioners = {"inference": inference, "fw": trains, "bw": trains}
    weights = module_weights(gm, example_inputs)
    preserve = frozenset(partitioners["inference"].ops_to_preserve())
    direct: dict[str, Callable[..., Any]] = {}
    with contextlib.ExitStack() as tracing:
        if not training:
            # linear, layer_norm, SDPA stay whole, as to_backend keeps them (decomposed,
            # attention alone ran 2x slower in ONNX Runtime). Ended before lowering.
            tracing.enter_context(keeping_composite_ops_whole(preserve))
        compilers = {
            f"{kind}_compiler": functools.partial(
                _compile_aten,
                kind=kind,
                settings=per_kind[kind],
                partitioner=partitioners[kind],
                report=report,
                weights=weights if kind == "inference" else {},
                traced=tracing.close,
                direct=direct if kind == "inference" else None,
                dynamo_inputs=example_inputs,
            )
            for kind in ("fw", "bw", "inference")
        }
        compiled = aot_autograd(
            **compilers,
            partition_fn=min_cut_rematerialization_partition,
            decompositions=decomposition_table(preserve, training=training),
        )(gm, example_inputs)
    # An inference graph whose aot_autograd wrappers would do nothing is called directly.
    return direct.get("call", compiled)


def _compile_aten(
    gm: GraphModule,
    example_inputs: Sequence[Any],
    *,
    kind: str,
    settings: Settings,
    partitioner: CapabilityPartitioner,
    report: CompileReport,
    weights: Mapping[int, tuple[str, torch.Tensor]],
    traced: Callable[[], None],
    direct: dict[str, Callable[..., Any]] | None,
    dynamo_inputs: Sequence[Any],
) -> Any:
    """aot_autograd's compiler: one functional ATen graph -> a boxed callable.

    For an inference graph it also puts into `direct["call"]` a callable that Dynamo may
    call instead of aot_autograd's wrappers, when those would pass everything through.

    `weights`: Dynamo input index -> (name, tensor) for module parameters and buffers. In an
    inference graph they become the program's weights, so delegates own them (ONNX Runtime
    takes them as initializers: prepacked, fused). They are still passed on every call: a
    call with other tensors, or after an in-place change, restages the delegates first.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from nativert.backend.pipeline import fallback_message, lower_program
    from nativert.backend.runtime import Executor
    from nativert.partitioner.report import delegation_report
    from nativert.passes import COMPILE_AFTER_LOWERING, COMPILE_PIPELINE

    traced()  # tracing is over: end what only tracing needed
    weights = unmutated_weights(weights, len(example_inputs))
    program, template, order = program_from_aten(gm, example_inputs, weights)

    def on_fallback(exc: DelegateCompileError) -> None:
        message = fallback_message(exc)
        if message not in _warned:  # once per process, not once per recompile
            _warned.add(message)
            logger.warning("%s", message)

    # aot_autograd calls us under its fake mode; delegates get real weights. Given a
    # partitioner, the pipeline does not compare with PyTorch itself: the backend compares
    # the whole graph, on real inputs (choose.py).
    with unset_fake_temporarily():
        result = lower_program(
            program,
            settings,
            partitioner=partitioner,
            passes=COMPILE_PIPELINE,
            after_lowering=COMPILE_AFTER_LOWERING,
            on_fallback=on_fallback,
        )
        executor = Executor(result.program)
    report.graphs.append(
        GraphCompile(
            kind=_KINDS[kind],
            report=delegation_report(result.program),
            program=result.program,
            fallbacks=list(result.fallbacks),
            seconds=result.seconds,
            cache_hits=result.cache_hits,
            cache_misses=result.cache_misses,
        )
    )
    run = _runner(executor, order, weights)
    if direct is not None and wrappers_pass_through(example_inputs, dynamo_inputs):
        from torch._dynamo import disable

        # Like aot_autograd's own result, run without Dynamo: it must not trace our frames.
        direct["call"] = disable(_unboxed(run, template), reason="nativert compiled graph")
    return _boxed(run, template)


def _unboxed(run: Any, template: list | None) -> Any:
    """Dynamo's calling convention: the args themselves."""
    if template is None:

        def compiled(*args: Any) -> Any:
            return run(args)

    else:

        def compiled(*args: Any) -> Any:
            outputs = iter(run(args))
            return [next(outputs) if slot is None else slot[0] for slot in template]

    return compiled


def _boxed(run: Any, template: list | None) -> Any:
    """aot_autograd's calling convention: one list of args, which the callee may free."""
    if template is None:

        def compiled(args: list) -> Any:
            outputs = run(args)
            args.clear()
            return outputs

    else:

        def compiled(args: list) -> Any:
            outputs = iter(run(args))
            args.clear()
            return [next(outputs) if slot is None else slot[0] for slot in template]

    compiled._boxed_call = True
    return compiled


_VERSION = operator.attrgetter("_version")


def _version_sum(tensors: Sequence[torch.Tensor]) -> int | None:
    """Sum of the tensors' version counters (each only grows, so for the same tensors an
    equal sum means no in-place change); None if one is an inference tensor (no counter)."""
    if any(t.is_inference() for t in tensors):
        return None
    return sum(map(_VERSION, tensors))


def _picker(indices: Sequence[int]) -> Callable[[list], Sequence[Any]]:
    """args -> the args at `indices` (sorted), in C: a slice when they are a range."""
    if not indices:
        return operator.itemgetter(slice(0, 0))
    first, last = indices[0], indices[-1]
    if list(indices) == list(range(first, last + 1)):
        return operator.itemgetter(slice(first, last + 1))
    return operator.itemgetter(*indices)  # two or more, so it returns a tuple


def _runner(executor: Any, order: list[int], weights: Mapping[int, tuple[str, torch.Tensor]]):
    """args -> outputs: user inputs to the Executor, weights checked against its own.

    The check is the per-call price of letting delegates own the weights: the module's
    parameters arrive as arguments, and a call with other tensors (a parameter replaced) or
    after an in-place change (optimizer step, load_state_dict) restages the delegates first.
    It runs in C: identity by `map(is_not)`, in-place changes by the sum of version counters.
    """
    run_flat = executor.run_flat
    if not weights:
        return run_flat
    users = _picker([i for i in order if i not in weights])
    positions = sorted(weights)
    names = [weights[i][0] for i in positions]
    weights_of = _picker(positions)
    initial = tuple(weights[i][1] for i in positions)
    bound = (initial, _version_sum(initial))
    lock = threading.Lock()

    def stale(current: Sequence[torch.Tensor]) -> bool:
        tensors, versions = bound
        return any(map(operator.is_not, current, tensors)) or (
            versions is not None and sum(map(_VERSION, current)) != versions
        )

    def run(args: list) -> Any:
        current = weights_of(args)
        tensors, versions = bound  # the check of stale(), inline: it runs on every call
        if any(map(operator.is_not, current, tensors)) or (
            versions is not None and sum(map(_VERSION, current)) != versions
        ):
            restage(current)
        return run_flat(users(args))

    def restage(current: Sequence[torch.Tensor]) -> None:
        nonlocal bound
        with lock:
            if stale(current):  # not restaged meanwhile by another thread
                executor.update_weights(dict(zip(names, current, strict=True)), strict=False)
                bound = (tuple(current), _version_sum(current))

    return run

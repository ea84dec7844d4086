"""`torch.compile(model, backend="nativert")`: Dynamo graphs through our delegates.

Dynamo hands the backend one FX graph per traced region (a graph break makes several).
aot_autograd turns each into functional core ATen with parameters lifted to inputs: one
*forward* and one *backward* graph when something requires grad, one *inference* graph
otherwise. aot_autograd decomposes with `nativert.passes.decomposition_table`, keeping whole
the ops the chosen delegates preserve. Each graph then goes through the one pipeline
(`backend/pipeline.py`: passes, partition, lower, with the on-disk payload cache) and runs on
an Executor. aot_autograd keeps the autograd bookkeeping (saved activations, input mutations
such as batch-norm running stats), so training works with both graphs delegated.

Settings come from `torch.compile(..., options={...})` (`nativert.Settings` fields). What
each compile did (regions, fallbacks, cache hits, time) is in `last_compile_report()`.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.fx import GraphModule

from nativert.backend.compile.aot import (
    module_weights,
    needs_grad,
    program_from_aten,
    unmutated_weights,
)
from nativert.backend.autotune import candidate_settings
from nativert.backend.compile.report import CompileReport, GraphCompile, new_report
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
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from nativert.passes import decomposition_table

    settings = Settings.from_options(options)
    # Autotune partitions with every available delegate as a candidate (autotune.py).
    partitioner = CapabilityPartitioner.from_settings(
        candidate_settings(settings) if settings.autotune else settings
    )
    report = new_report(settings)
    weights = module_weights(gm, example_inputs)
    compilers = {
        f"{kind}_compiler": functools.partial(
            _compile_aten,
            kind=kind,
            settings=settings,
            partitioner=partitioner,
            report=report,
            weights=weights if kind == "inference" else {},
        )
        for kind in ("fw", "bw", "inference")
    }
    preserve = frozenset(partitioner.ops_to_preserve())
    return aot_autograd(
        **compilers,
        partition_fn=min_cut_rematerialization_partition,
        decompositions=decomposition_table(preserve, training=needs_grad(example_inputs)),
    )(gm, example_inputs)


def _compile_aten(
    gm: GraphModule,
    example_inputs: Sequence[Any],
    *,
    kind: str,
    settings: Settings,
    partitioner: CapabilityPartitioner,
    report: CompileReport,
    weights: Mapping[int, tuple[str, torch.Tensor]],
) -> Any:
    """aot_autograd's compiler: one functional ATen graph -> a boxed callable.

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

    weights = unmutated_weights(weights, len(example_inputs))
    program, template, order = program_from_aten(gm, example_inputs, weights)

    def on_fallback(exc: DelegateCompileError) -> None:
        message = fallback_message(exc)
        if message not in _warned:  # once per process, not once per recompile
            _warned.add(message)
            logger.warning("%s", message)

    # aot_autograd calls us under its fake mode; delegates get real weights.
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
    return _boxed(_runner(executor, order, weights), template)


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


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return -1


def _runner(executor: Any, order: list[int], weights: Mapping[int, tuple[str, torch.Tensor]]):
    """args -> outputs: user inputs to the Executor, weights checked against its own."""
    run_flat = executor.run_flat
    if not weights:
        return run_flat
    user = [i for i in order if i not in weights]
    names = [weights[i][0] for i in sorted(weights)]
    positions = sorted(weights)
    bound = [(weights[i][1], _version(weights[i][1])) for i in positions]
    lock = threading.Lock()

    def run(args: list) -> Any:
        for (tensor, version), i in zip(bound, positions, strict=True):
            given = args[i]
            if given is not tensor or _version(given) != version:
                restage(args)
                break
        return run_flat([args[i] for i in user])

    def restage(args: list) -> None:
        # The module's weights were replaced or changed in place since the last call.
        with lock:
            current = [args[i] for i in positions]
            executor.update_weights(dict(zip(names, current, strict=True)), strict=False)
            bound[:] = [(t, _version(t)) for t in current]

    return run

"""Which way runs a Dynamo graph, by measurement on the call that compiles it.

Dynamo hands the backend real example inputs (the values of the call being compiled). With
`Settings.compare_with_pytorch` (the default), the backend times the delegated graph against
the same graph run by PyTorch as it is (what eager runs, kernel for kernel), on those inputs,
and keeps the faster: `torch.compile(backend="nativert")` then never runs a graph slower than
eager would (within the noise of one measurement). When the graph trains, a run is forward
and backward, shaped like a training step (`_run`; `torch.autograd.grad`, so no `.grad`
changes);
with `autotune=True` inductor's compile of the graph is a third candidate.

Measuring leaves no trace: buffers and inputs a run mutates (batch-norm running stats) are
restored, and so is the random number generator, so the first training step computes what
eager's does. A candidate whose outputs (and gradients) differ from PyTorch's is not chosen
(unless the graph draws random numbers, e.g. dropout, where runs differ by design).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from nativert.backend.autotune import Measurement, _first_line, time_interleaved
from nativert.errors import DelegateCompileError

logger = logging.getLogger("nativert")

NATIVERT = "nativert"
PYTORCH = "pytorch"
INDUCTOR = "inductor"


@dataclasses.dataclass(frozen=True)
class GraphChoice:
    """What runs one Dynamo graph, and what was measured (ms per run, forward and backward
    when training)."""

    choice: str
    measurements: tuple[Measurement, ...]
    training: bool
    cached: bool = False

    def line(self) -> str:
        found = ", ".join(m.text() for m in self.measurements)
        what = "forward+backward" if self.training else "inference"
        cached = ", cached decision" if self.cached else ""
        return f"runs on {self.choice} ({what}: {found}{cached})"


def candidate_names(training: bool, autotune: bool) -> list[str]:
    """PyTorch (the reference), nativert's delegates and, for training under autotune,
    inductor."""
    return [PYTORCH, NATIVERT, *([INDUCTOR] if training and autotune else [])]


def decision_key(gm: torch.fx.GraphModule, inputs: Sequence[Any], names, settings) -> str:
    """What a cached choice depends on: the graph, its inputs (shapes, dtypes, which need
    grad), the candidates and the delegates' versions, the settings that shape the delegated
    graph, the machine and torch's threads."""
    from nativert.backend.autotune import _version, candidate_settings, digest, machine, value_text

    shaping = {
        f.name: repr(getattr(settings, f.name))
        for f in dataclasses.fields(settings)
        if f.name not in ("cache_dir", "progress", "autotune_budget_s", "strict")
    }
    parts = {
        "kind": "torch.compile graph",
        "code": gm.code,
        "inputs": [value_text(v, grad=True) for v in inputs],
        "candidates": names,
        "delegates": {b: _version(b) for b in candidate_settings(settings).delegates or ()},
        "settings": shaping,
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    return digest(parts)


def is_fake(example_inputs: Sequence[Any]) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(x, FakeTensor) for x in example_inputs)


# Ops whose runs differ by design, by name: torch functions, Tensor methods and aten ops.
_RANDOM_OPS = frozenset(
    {
        "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "native_dropout",
        "feature_alpha_dropout", "feature_dropout", "rrelu", "rrelu_", "rrelu_with_noise",
        "bernoulli", "bernoulli_", "rand", "rand_like", "randn", "randn_like", "randint",
        "randint_like", "randperm", "normal", "normal_", "uniform_", "exponential_",
        "cauchy_", "geometric_", "log_normal_", "random_", "multinomial", "poisson",
    }
)  # fmt: skip
_RANDOM_MODULES = frozenset(
    {"Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout"}
    | {"RReLU"}
)


def draws_random_numbers(gm: torch.fx.GraphModule) -> bool:
    """Whether the graph calls something random (its runs differ by design): a random op or
    module, or attention with dropout."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            if type(gm.get_submodule(node.target)).__name__ in _RANDOM_MODULES:
                return True
        elif node.op in ("call_function", "call_method"):
            target = node.target
            name = target if isinstance(target, str) else getattr(target, "__name__", "")
            if isinstance(target, torch._ops.OpOverload):
                name = target._schema.name.split("::")[-1]
            if name in _RANDOM_OPS:
                return True
            if name == "scaled_dot_product_attention":
                p = node.kwargs.get("dropout_p", node.args[3] if len(node.args) > 3 else 0.0)
                if not isinstance(p, (int, float)) or p > 0:
                    return True
    return False


def choose(
    candidates: dict[str, Callable[..., Any]],
    example_inputs: Sequence[Any],
    *,
    training: bool,
    check: Callable[[list[Any], list[Any]], None] | None,
    timer: Callable[[dict[str, Callable[[], Any]]], dict[str, float]] | None = None,
) -> GraphChoice:
    """Time each candidate (PyTorch first: the reference) on `example_inputs`; the fastest
    that answers as PyTorch does wins, PyTorch on a tie. `check(got, expected)` raises when a
    candidate's outputs are wrong (None: not compared)."""
    timer = timer or (lambda cases: time_interleaved(cases, no_grad=not training))
    with _restored(example_inputs) as restore:
        runs = {name: _run(fn, example_inputs, training) for name, fn in candidates.items()}
        failures: dict[str, str] = {}
        expected = None
        for name, run in runs.items():
            restore()  # each candidate starts from the state the call came with
            try:
                got = run()
            except Exception as exc:
                if name == PYTORCH:
                    # Nothing to compare or time against (e.g. an op with no derivative in
                    # a graph that only looked like training): the delegated graph stays.
                    logger.info("nativert: not timed against PyTorch: %s", _first_line(exc))
                    return GraphChoice(
                        NATIVERT, (Measurement(PYTORCH, None, _first_line(exc)),), training
                    )
                failures[name] = _first_line(exc)
                continue
            if expected is None:
                expected = got
            elif check is not None:
                try:
                    check(got, expected)
                except Exception as exc:  # DelegateCompileError: wrong; others: not comparable
                    failures[name] = (
                        str(exc)
                        if isinstance(exc, DelegateCompileError)
                        else (f"outputs not comparable: {_first_line(exc)}")
                    )
        cases = {name: run for name, run in runs.items() if name not in failures}
        times = timer(cases)
    measurements = tuple(
        Measurement(name, times.get(name), failures.get(name)) for name in candidates
    )
    fastest = min(times, key=lambda name: (times[name], name != PYTORCH))
    for name, why in failures.items():
        logger.warning("nativert: the %s candidate of a torch.compile graph failed: %s", name, why)
    return GraphChoice(fastest, measurements, training)


def _run(fn: Callable[..., Any], inputs: Sequence[Any], training: bool) -> Callable[[], Any]:
    """One run of `fn`: its outputs (and, when training, the input gradients).

    A training run is shaped like a training step, because what a delegate costs there
    includes handing the cores back and forth: PyTorch computes a loss from the outputs
    (the sum), the backward starts from it, and PyTorch reads every gradient afterwards (as an
    optimizer does). Timed back to back without those, an MLP's delegated forward+backward
    measured 6% faster than PyTorch's while its training step was 1.6x slower."""
    if not training:
        return lambda: _flat(fn(*inputs))
    wrt = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

    def run() -> list[Any]:
        with torch.enable_grad():
            outputs = _flat(fn(*inputs))
            grads_of = [o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad]
            if not grads_of:
                return outputs
            loss = sum((o.real if o.is_complex() else o).sum() for o in grads_of)
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        present = [g for g in grads if g is not None]
        if present:
            torch._foreach_mul(present, 1.0)  # an optimizer's read of every gradient
        return [*(o.detach() if isinstance(o, torch.Tensor) else o for o in outputs), *grads]

    return run


def _flat(outputs: Any) -> list[Any]:
    return list(torch.utils._pytree.tree_leaves(outputs))


def checker(
    precision: str, accuracy: float, quantized: bool = False
) -> Callable[[list[Any], list[Any]], None]:
    """Outputs within rounding of PyTorch's at fp32, within `accuracy` below it or for a
    quantized graph (as autotune checks its candidates)."""
    from nativert.backend.autotune import _check

    return lambda got, expected: _check(got, expected, precision, accuracy, quantized)


class _restored:
    """Snapshots what runs may change, and puts it back on every call of the restore function
    it returns and on exit: the random number generators (CPU and CUDA) and the example
    inputs a run may write (buffers such as batch-norm running stats, inputs changed in place,
    inference tensors, which have no version counter to tell). Parameters are not written by a
    forward or backward; one that changed anyway is reported."""

    def __init__(self, inputs: Sequence[Any]) -> None:
        self.inputs = [x for x in inputs if isinstance(x, torch.Tensor)]

    def __enter__(self) -> Callable[[], None]:
        self.rng = torch.get_rng_state()
        self.cuda = any(x.is_cuda for x in self.inputs)
        self.cuda_rng = torch.cuda.get_rng_state_all() if self.cuda else None
        self.saved = []
        with torch.no_grad():
            for x in self.inputs:
                if x.is_inference():
                    with torch.inference_mode():
                        self.saved.append((x, None, x.clone()))
                elif x.requires_grad:
                    self.saved.append((x, x._version, None))
                else:
                    self.saved.append((x, x._version, x.detach().clone()))
        return self.restore

    def restore(self) -> None:
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        for x, version, copy in self.saved:
            if copy is None:
                if x._version != version:
                    logger.warning("nativert: a parameter changed while a graph was timed")
            elif x.is_inference():
                with torch.inference_mode():
                    x.copy_(copy)
            elif x._version != version:
                with torch.no_grad():
                    x.copy_(copy)

    def __exit__(self, *exc: Any) -> None:
        self.restore()

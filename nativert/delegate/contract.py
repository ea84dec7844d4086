"""The two delegate contracts: `Delegate` (compile time) and `DelegateExecutor` (run time).

A *delegate* is a backend at compile time: it says which nodes it can run, which ops it wants
kept whole by decomposition, and turns a segment (an ExportedProgram) into payload bytes.
A *delegate executor* is the same backend at run time, built from those bytes by
`Delegate.load`: it owns its compiled payload and weights and runs flat lists of tensors.

Every member nativert reads is declared on `Delegate` with its default, so a delegate states
what it is by overriding, and nothing is probed with getattr.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from nativert._program.quant import INT8
from nativert.errors import WeightsError

JSONValue = Any  # str | int | float | bool | None | list | dict of those


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """One named compile option for a delegate. Values must be JSON-serialisable."""

    key: str
    value: JSONValue


def package_versions(*names: str) -> dict[str, str]:
    """Installed version of each Python distribution, "missing" where it is not installed:
    what `Delegate.toolchain` usually returns."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "missing"
    return versions


def dict_to_specs(options: Mapping[str, JSONValue] | None) -> list[CompileSpec]:
    return [CompileSpec(key, value) for key, value in sorted((options or {}).items())]


# The precisions nativert knows, and the compile spec that asks a delegate for one. Every
# delegate that offers more than fp32 (`Delegate.precisions`) takes it; its absence is fp32.
FP32 = "fp32"
PRECISIONS = ("fp32", "bf16", "fp16")
PRECISION_SPEC = "precision"
# A region of a PT2E-quantized program (quantize/dequantize around its ops) gets "int8" from
# the partitioner when its delegate offers it: the delegate runs those patterns on its int8
# kernels. Without it the delegate computes them in fp32, exactly as PyTorch does (what the
# accuracy guard falls back to). Not a `precision` setting: quantizing is nativert.quantize.
SPEC_PRECISIONS = (*PRECISIONS, INT8)
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def spec_precision(compile_specs: Sequence[CompileSpec] | Mapping[str, JSONValue]) -> str:
    """The precision compile specs ask for ("fp32" when they do not say)."""
    if isinstance(compile_specs, Mapping):
        return str(compile_specs.get(PRECISION_SPEC, FP32))
    for spec in compile_specs:
        if spec.key == PRECISION_SPEC:
            return str(spec.value)
    return FP32


@dataclasses.dataclass(frozen=True)
class Availability:
    """Whether a delegate's runtime can be used here; falsy with the reason when it cannot."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


@runtime_checkable
class DelegateExecutor(Protocol):
    """A delegate at run time: what `Delegate.load` returns and what the Executor calls.

    Weights are named by the segment's weight targets (the original FQNs). `run` takes the
    segment's non-weight inputs in order and returns a tuple of *new* tensors: outputs never
    alias inputs, weights or each other (callers rely on it, as torch's HOP tracing does).

    The weight life cycle: `init_weights` = `process_weights` + `commit_weights`;
    `process_weights` validates and stages (a failure changes nothing); `commit_weights`
    switches to the staged weights atomically; `discard_weights` drops them. `active_state()`
    is the committed state and `run_with(state, inputs)` runs on exactly that snapshot, so a
    program-wide swap across several delegates is atomic (the Executor relies on it).
    `StagedWeights` implements all of this around two methods.
    """

    def init_weights(self, weights: Mapping[str, torch.Tensor]) -> None: ...

    def process_weights(self, weights: Mapping[str, torch.Tensor]) -> None: ...

    def commit_weights(self) -> None: ...

    def discard_weights(self) -> None: ...

    def active_state(self) -> Any: ...

    def run_with(self, state: Any, inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]: ...

    def run(self, inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]: ...


class Delegate(abc.ABC):
    """A delegate at compile time. Subclass it, set `backend_id`, implement the three
    abstract methods, and override the defaults that do not fit.

    Attributes (class-level defaults):
        backend_id: the name partitioners, settings and packages use.
        version: of the payload format; a package written by another version runs its
            reference program instead (or fails under strict loading).
        priority: order among delegates, higher first (built-ins: tensorrt 400,
            onnxruntime 300, openvino 250, aoti 200, eager 0). Ties go by backend_id.
        reference: a reference, not a fast path (eager): default partitioning uses it only
            when no other delegate is available.
        default_candidate: False for delegates used only when named (aoti: compiles take
            seconds).
        cacheable: payloads depend only on the segment's graph, specs and versions, never on
            weight values, so the on-disk payload cache may reuse them.
        thread_spec: the compile-spec key that sets this delegate's intra-op thread count;
            the `num_threads` setting fills it in. None: the delegate takes no thread count.
        compile_spec_keys: the compile specs it accepts; None accepts any key (then
            `check_compile_specs` should check them).
        hybrid_compile_specs: compile specs added (unless the settings set the key) when
            the program runs other code between this delegate's calls: PyTorch nodes or
            other regions (onnxruntime: its idle threads stop spinning, so they do not take
            the cores that code needs next).
        executes_native_code: loading a payload runs native code (a shared library, an
            engine), so `nativert.load` refuses such segments of a package unless the caller
            trusts the file. True by default: nativert cannot know what a third-party
            delegate's payload does.
        fast_compile: compiling a region takes well under a second. Under a `precision`
            setting below fp32, the delegates that offer it and compile fast are offered
            regions first even when they are not default candidates (openvino); slow ones
            (aoti, tensorrt) only when named or by autotune.

    Precision: `precisions()` names what the delegate may compute in here ("fp32" always
    first). A delegate offering more takes the `precision` compile spec (it lists
    PRECISION_SPEC in `compile_spec_keys`; the base `check_compile_specs` checks the value)
    and realises it its own way: a runtime
    switch (openvino), or `nativert.passes.lower_precision` on the segment (aoti). Inputs and
    outputs of a segment keep their dtypes whatever it computes in.
    """

    backend_id: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    priority: ClassVar[int] = 100
    reference: ClassVar[bool] = False
    default_candidate: ClassVar[bool] = True
    cacheable: ClassVar[bool] = False
    thread_spec: ClassVar[str | None] = None
    compile_spec_keys: ClassVar[frozenset[str] | None] = frozenset()
    hybrid_compile_specs: ClassVar[Mapping[str, JSONValue]] = {}
    executes_native_code: ClassVar[bool] = True
    fast_compile: ClassVar[bool] = True

    def precisions(self) -> tuple[str, ...]:
        """What this delegate may compute in, here (it may depend on the CPU or GPU)."""
        return (FP32,)

    def is_available(self) -> Availability:
        """Whether its runtime works here; falsy with the reason (what to install) if not."""
        return Availability(True)

    def toolchain(self) -> dict[str, str]:
        """Versions of the tools it compiles with: part of the cache key, and shown by
        `nativert inspect`."""
        return {}

    @abc.abstractmethod
    def check_support(self, node: Node) -> str | None:
        """None when this delegate can run `node`, else a short reason why not."""

    def ops_to_preserve(self) -> frozenset[torch._ops.OpOverload]:
        """Ops that decomposition must keep whole because this delegate runs them better."""
        return frozenset()

    def check_compile_specs(self, specs: Mapping[str, JSONValue]) -> None:
        """Raise ValueError naming a compile spec this delegate does not take."""
        if self.compile_spec_keys is not None:
            unknown = sorted(set(specs) - self.compile_spec_keys)
            if unknown:
                raise ValueError(
                    f"delegate {self.backend_id!r} has no compile specs {unknown}; valid: "
                    f"{sorted(self.compile_spec_keys)}"
                )
        self.check_precision_spec(specs)

    def check_precision_spec(self, specs: Mapping[str, JSONValue]) -> None:
        """Raise ValueError when specs ask for a precision nativert does not know.

        Not judged by what this machine offers: a package lowered for bf16 elsewhere still
        loads, and the delegate honours the spec as well as its runtime can here (the
        `precision` setting is where "not offered here" is refused). A delegate takes the
        spec at all by listing PRECISION_SPEC in `compile_spec_keys`."""
        value = specs.get(PRECISION_SPEC, FP32)
        if value not in SPEC_PRECISIONS:
            raise ValueError(
                f"compile spec {PRECISION_SPEC!r} must be one of {list(SPEC_PRECISIONS)}, got "
                f"{value!r}"
            )

    def check_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Raise ValueError naming a weight whose values this delegate cannot run (checked
        at lowering even when the payload comes from the cache, whose key covers no weight
        values; an executor checks the weights it is given too). Default: any."""
        return None

    def weights_in_payload(self, compile_specs: Mapping[str, JSONValue]) -> bool:
        """Whether a payload compiled with these specs embeds the segment's weight values
        (aoti's int8 segments: inductor freezes them). Such payloads are never cached (the
        key covers no weight values), and their executors run only those weights. Default:
        False, the contract's norm (weights come from the program)."""
        return False

    def check_payload(self, payload: bytes) -> None:
        """Raise ValueError if `payload`, from a package nobody vouches for, must not be
        loaded (e.g. it points the runtime at files); called by `nativert.load`. The
        default accepts every payload."""
        return None

    @abc.abstractmethod
    def preprocess(self, program: ExportedProgram, compile_specs: Sequence[CompileSpec]) -> bytes:
        """Compile a segment (weights lifted as its first placeholders) to payload bytes."""

    @abc.abstractmethod
    def load(
        self,
        payload: bytes,
        compile_specs: Sequence[CompileSpec],
        *,
        reference: ExportedProgram,
    ) -> DelegateExecutor:
        """A new executor for `payload`; `reference` is the segment's program."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.backend_id!r}>"


class StagedWeights:
    """The weight life cycle of DelegateExecutor, around two methods a subclass writes:
    `process_weights` (validate, build the run state, hand it to `_stage`) and
    `run_with(state, inputs)`. `commit_weights` makes the staged state active (extend
    `_activate` when the runtime must switch too); `run` reads it once, so a concurrent commit
    never tears a call.
    """

    _name: str = "delegate"
    weight_names: tuple[str, ...] = ()

    def _init_state(self, active: Any = None) -> None:
        self._active = active
        self._staged: Any = None
        self._stage_lock = threading.Lock()

    def process_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def run_with(self, state: Any, inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def init_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        self.process_weights(weights)
        self.commit_weights()

    def _stage(self, state: Any) -> None:
        with self._stage_lock:
            self._staged = state

    def commit_weights(self) -> None:
        with self._stage_lock:
            if self._staged is None:
                raise WeightsError(
                    f"delegate {self._name!r}: commit_weights() called with nothing staged; "
                    "call process_weights(weights) first"
                )
            self._activate(self._staged)
            self._staged = None

    def _activate(self, staged: Any) -> None:
        """Make `staged` the active state (called by commit_weights, under the stage lock)."""
        self._active = staged

    def discard_weights(self) -> None:
        with self._stage_lock:
            self._staged = None

    def active_state(self) -> Any:
        state = self._active
        if state is None:
            raise WeightsError(
                f"delegate {self._name!r}: run() before init_weights(); it needs "
                f"{list(self.weight_names)}"
            )
        return state

    def run(self, inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        return self.run_with(self.active_state(), inputs)

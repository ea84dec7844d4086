"""The `aoti` delegate: segments compiled ahead of time by AOTInductor.

Compile: the segment's ExportedProgram goes through `torch._inductor.aoti_compile_and_package`
with its dynamic dims kept. Compile specs are Inductor config options. The payload is the
package's bytes without weight data (`aot_inductor.package_constants_in_so=False`), and
`always_keep_tensor_constants=True` keeps even tiny weights (Inductor inlines tensors of up to
8 elements otherwise) as constants that can be updated.

Run: the payload's model files (the shared library, and the JSON the proxy executor needs
for custom ops) are extracted to a temporary directory, loaded by an
`AOTIModelContainerRunnerCpu` (or `...Cuda` for a CUDA segment), and the directory is removed.
Calls pass flat tensor lists to the runner.

Weights: the runner has an active and an inactive constant buffer. `process_weights`
validates names, shapes and dtypes (the runner itself accepts wrong shapes silently), then
copies the weights into the inactive buffer; `commit_weights` swaps the buffers, which waits
for runs in flight. A failed `process_weights` never touches the active buffer.

A call holds a snapshot (`active_state()`) so that a program-wide weight update is atomic
across delegates (see the Executor). A call whose snapshot is older than the last commit, a
call that was in flight across the swap, runs the reference graph with its snapshot's
weights: correct, slower, rare.

Precision: a segment lowered below fp32 (the `precision` compile spec) is rewritten by
`nativert.passes.lower_precision` (casts where float32 weights and inputs enter, float32
outputs) and compiled with runtime constant folding, so AOTInductor converts the weights
once (and again after a weight swap, on the first call) instead of on every call. It offers
bf16 on every CPU (where the CPU has no bf16 instructions inductor emulates them, slower than
fp32: autotune measures) and fp16 where CUDA is available.

int8: a region of a PT2E-quantized program (the `int8` precision spec, from the partitioner)
compiles with `freezing=True` under no_grad: inductor's x86 int8 lowering (oneDNN's
quantized linear and conv) happens only then, and it folds the weights into prepacked
constants of the library. Such a payload embeds its weights (with their digest): it is
never cached, it needs the caller's trust like every aoti payload, and its executor runs
only the weights it was compiled with (a swap to other weights raises WeightsError; lower
again, or use onnxruntime/openvino for quantized regions whose weights change). Without the
spec a quantized region computes its Q/DQ arithmetic in fp32, as PyTorch does.

AOTInductor compiles take seconds, so `aoti` is not a default candidate: name it
(`CapabilityPartitioner(["onnxruntime", "aoti"])`, `options={"delegates": [...]}`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import platform
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from nativert._program import (
    placeholder_values,
    unalias_outputs,
    validate_weights,
    weight_names,
    weight_tensor,
)
from nativert.delegate import (
    FP32,
    INT8,
    PRECISION_SPEC,
    TORCH_DTYPES,
    Availability,
    CompileSpec,
    Delegate,
    StagedWeights,
)
from nativert.errors import DelegateCallError, DelegateCompileError, NativertError, WeightsError

# Set by the delegate; a compile spec cannot change them (see the module docstring).
_FIXED_CONFIG = {
    "aot_inductor.package_constants_in_so": False,
    "always_keep_tensor_constants": True,
}
_MODEL_DIR = "/data/aotinductor/"
_FOLDED_PREFIX = "_FOLDED_CONST_"
# int8: inductor's x86 int8 lowering (oneDNN's quantized kernels) happens only with freezing,
# which folds the weights into prepacked constants of the library: they go in the payload,
# with the digest of the weights they came from.
_INT8_CONFIG = {"freezing": True, "aot_inductor.package_constants_in_so": True}
_WEIGHTS_DIGEST = "nativert/frozen_weights.sha256"


def weights_digest(names: Sequence[str], weights: Mapping[str, torch.Tensor]) -> str:
    """sha256 over each weight's name, dtype, shape and bytes, in order."""
    digest = hashlib.sha256()
    for name in names:
        tensor = weights[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _frozen_digest(payload: bytes) -> str | None:
    """The digest of the weights an int8 payload froze in, None for other payloads."""
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            if _WEIGHTS_DIGEST not in archive.namelist():
                return None
            return archive.read(_WEIGHTS_DIGEST).decode()
    except zipfile.BadZipFile:
        return None  # _load_runner says what is wrong with it


def _segment_device(program: ExportedProgram) -> torch.device:
    devices = {
        v.device
        for v in placeholder_values(program)
        if isinstance(v, torch.Tensor) and v.device.type != "meta"
    }
    if len(devices) > 1:
        raise DelegateCompileError(
            "aoti: a segment must run on one device, this one reads tensors on "
            f"{sorted(map(str, devices))}"
        )
    return devices.pop() if devices else torch.device("cpu")


class _ReadWriteLock:
    """Many runs at once, or one buffer swap: a swap never lands in the middle of a run that
    checked its snapshot."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._writer = True
            while self._readers:
                self._cond.wait()

    def release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class _Snapshot:
    """One committed set of weights (kept for stale calls, which run the reference)."""

    __slots__ = ("weights",)

    def __init__(self, weights: tuple[torch.Tensor, ...]) -> None:
        self.weights = weights


def _load_runner(payload: bytes, device: torch.device) -> Any:
    """An AOTIModelContainerRunner over the payload's model files."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(payload))
    except zipfile.BadZipFile as exc:
        raise NativertError(
            f"aoti payload ({len(payload)} bytes) is not an AOTInductor package: {exc}"
        ) from exc
    names = [n for n in archive.namelist() if _MODEL_DIR in n and not n.endswith("/")]
    libraries = [n for n in names if n.endswith(".so")]
    if len(libraries) != 1:
        raise NativertError(
            f"aoti payload must hold exactly one model library, found {libraries or 'none'}"
        )
    directory = tempfile.mkdtemp(prefix="nativert-aoti-")
    try:
        for name in names:
            archive.extract(name, directory)  # zipfile refuses paths that leave `directory`
        library = os.path.join(directory, libraries[0])
        concurrency = max(1, min(8, os.cpu_count() or 1))
        if device.type == "cuda":
            return torch._C._aoti.AOTIModelContainerRunnerCuda(library, concurrency, str(device))
        return torch._C._aoti.AOTIModelContainerRunnerCpu(library, concurrency)
    finally:
        # The library is loaded (and the proxy executor's JSON read): the files can go.
        shutil.rmtree(directory, ignore_errors=True)


class AotiExecutor(StagedWeights):
    """Runs one AOTInductor payload; see the module docstring."""

    def __init__(
        self, payload: bytes, compile_specs: Sequence[CompileSpec], reference: ExportedProgram
    ) -> None:
        self._name = "aoti"
        self._reference = reference
        self.weight_names = weight_names(reference)
        values = placeholder_values(reference)
        count = len(self.weight_names)
        self._expected = dict(zip(self.weight_names, values[:count], strict=True))
        self._inputs = [
            (v.dtype, v.device.type, bool(v.is_contiguous()))
            if isinstance(v, torch.Tensor)
            else None
            for v in values[count:]
        ]
        self._device = _segment_device(reference)
        self._runner = _load_runner(payload, self._device)
        # An int8 payload runs the weights it froze in, and only those (see process_weights).
        self._frozen = _frozen_digest(payload)
        if self._frozen is not None:
            self._constants: dict[str, str] = {}
            self._swap_lock = _ReadWriteLock()
            self._init_state(active=None if self.weight_names else _Snapshot(()))
            return
        fqns = {
            name: fqn
            for name, fqn in self._runner.get_constant_names_to_original_fqns().items()
            # Runtime constant folding's results (a lower-precision segment's converted
            # weights): computed by the runner from the weights, never passed in.
            if not name.startswith(_FOLDED_PREFIX)
        }
        unknown = sorted(set(fqns.values()) - set(self.weight_names))
        if unknown:
            raise NativertError(
                f"aoti payload has constants {unknown} that are not weights of its segment "
                f"{sorted(self.weight_names)}; recompile the segment"
            )
        self._constants = {fqn: name for name, fqn in fqns.items()}  # weight -> constant
        self._swap_lock = _ReadWriteLock()
        self._init_state(active=None if self.weight_names else _Snapshot(()))

    # -- weights ---------------------------------------------------------------------------
    def process_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        validate_weights(self._expected, weights, owner="delegate 'aoti'")
        wrong = [n for n in self.weight_names if weights[n].device.type != self._device.type]
        if wrong:
            raise WeightsError(
                f"delegate 'aoti': weights {wrong} are not on {self._device}, where this "
                "segment was compiled; move them there"
            )
        if self._frozen is not None and weights_digest(self.weight_names, weights) != self._frozen:
            raise WeightsError(
                "delegate 'aoti': this int8 segment's weights are frozen into its compiled "
                "library (inductor's int8 kernels need freezing), so it runs only the weights "
                "it was lowered with. Lower the program again with the new weights, or lower "
                "quantized regions to onnxruntime or openvino, whose weights swap"
            )
        snapshot = _Snapshot(tuple(weights[n].detach() for n in self.weight_names))
        buffer = {
            constant: weights[name].detach().contiguous()
            for name, constant in self._constants.items()
        }
        with self._stage_lock:  # one staging at a time, never during a commit's swap
            if buffer:
                # Copies into the inactive buffer: the active one, and runs, are untouched.
                self._runner.update_constant_buffer(buffer, True, True)
            self._staged = snapshot

    def _activate(self, staged: _Snapshot) -> None:
        self._swap_lock.acquire_write()  # waits for runs that checked their snapshot
        try:
            if self._constants:
                self._runner.swap_constant_buffer()
            self._active = staged
        finally:
            self._swap_lock.release_write()

    # -- running ---------------------------------------------------------------------------
    def _check(self, inputs: Sequence[Any]) -> list[torch.Tensor]:
        if len(inputs) != len(self._inputs):
            raise DelegateCallError(
                f"aoti delegate takes {len(self._inputs)} inputs, got {len(inputs)}"
            )
        ready = []
        for i, (value, want) in enumerate(zip(inputs, self._inputs, strict=True)):
            if want is None or not isinstance(value, torch.Tensor):
                raise DelegateCallError(
                    f"aoti delegate input {i} is a {type(value).__name__}; AOTInductor "
                    "segments take tensors only"
                )
            dtype, device, contiguous = want
            if value.dtype != dtype or value.device.type != device:
                raise DelegateCallError(
                    f"aoti delegate input {i} is {value.dtype} on {value.device}; it was "
                    f"compiled for {dtype} on {device}"
                )
            ready.append(value.contiguous() if contiguous else value)
        return ready

    def run_with(self, state: _Snapshot, inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        tensors = self._check(inputs)
        if self._frozen is not None:
            # torch 2.13's oneDNN int8 lowering fuses `x + qlinear(x)` into a "sum" post-op
            # that writes into x: measured, a transformer block's input changed on every
            # call. The caller's tensors must not: the library gets copies.
            tensors = [t.clone() for t in tensors]
        self._swap_lock.acquire_read()
        try:
            if state is self._active:
                # Inductor may return one buffer twice, a view of another output or of an
                # input (x.view(...)): the contract promises fresh tensors.
                return unalias_outputs(self._runner.run(tensors), (*tensors, *state.weights))
        finally:
            self._swap_lock.release_read()
        flat = (*state.weights, *tensors)  # a snapshot older than the last commit
        with torch.no_grad():
            return unalias_outputs(self._reference.graph_module(*flat), flat)


def _hint(dim: Any) -> int:
    if isinstance(dim, torch.SymInt):
        hint = dim.node.hint
        return int(hint) if hint is not None else 2
    return int(dim)


def _example_inputs(program: ExportedProgram) -> tuple[Any, ...]:
    """Zero tensors (and ints) shaped like the segment's user inputs at their size hints."""
    count = len(weight_names(program))
    examples = []
    for value in placeholder_values(program)[count:]:
        if isinstance(value, torch.Tensor):
            shape = [_hint(d) for d in value.shape]
            examples.append(torch.zeros(shape, dtype=value.dtype, device=value.device))
        else:
            examples.append(_hint(value))
    return tuple(examples)


def _has_compiler() -> str | None:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # no compiler found, or Inductor cannot load here
        return None


@contextlib.contextmanager
def _real_constants_allowed(program: ExportedProgram) -> Iterator[None]:
    """Let inductor's constant folding (a lower-precision segment's weight casts) meet the
    real weights under the fake mode the segment's metadata was traced with. torch.export's
    fake modes allow that; the one torch.compile hands over (aot_autograd's) does not."""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode(placeholder_values(program))
    if mode is None or mode.allow_non_fake_inputs:
        yield
        return
    mode.allow_non_fake_inputs = True
    try:
        yield
    finally:
        mode.allow_non_fake_inputs = False


class AotiDelegate(Delegate):
    backend_id = "aoti"
    priority = 200
    # Compiles take seconds: used only when named in a partitioner's or the compile
    # backend's delegate list.
    default_candidate = False
    cacheable = True
    compile_spec_keys = None  # Inductor config options: checked by check_compile_specs
    executes_native_code = True  # the payload is a shared library
    fast_compile = False

    def precisions(self) -> tuple[str, ...]:
        fp16 = ("fp16",) if torch.cuda.is_available() else ()
        int8 = (INT8,) if platform.machine().lower() in ("x86_64", "amd64") else ()
        return (FP32, "bf16", *fp16, *int8)

    def weights_in_payload(self, compile_specs: Mapping[str, Any]) -> bool:
        return compile_specs.get(PRECISION_SPEC, FP32) == INT8

    def check_compile_specs(self, specs: Mapping[str, Any]) -> None:
        from torch._inductor import config

        self.check_precision_spec(specs)
        fixed = sorted(set(specs) & set(_FIXED_CONFIG))
        if fixed:
            raise ValueError(f"compile specs {fixed} are set by the aoti delegate")
        known = config.get_config_copy()
        unknown = sorted(set(specs) - set(known) - {PRECISION_SPEC})
        if unknown:
            raise ValueError(
                f"{unknown} are not Inductor config options (torch._inductor.config); aoti "
                "compile specs are Inductor configs such as 'max_autotune'"
            )

    def toolchain(self) -> dict[str, str]:
        return {"compiler": str(_has_compiler())}

    def is_available(self) -> Availability:
        if _has_compiler() is None:
            return Availability(False, "AOTInductor needs a C++ compiler (g++ or clang++) on PATH")
        return Availability(True)

    def check_support(self, node: Node) -> str | None:
        # Inductor lowers what it can and calls ATen (or the op's own kernel, for custom
        # ops) for the rest, so every tensor op runs; complex outputs need a fallback kernel.
        return None

    def preprocess(self, program: ExportedProgram, compile_specs: Sequence[CompileSpec]) -> bytes:
        config = {spec.key: spec.value for spec in compile_specs}
        fixed = sorted(set(config) & set(_FIXED_CONFIG))
        if fixed:
            raise DelegateCompileError(f"aoti: compile specs {fixed} are set by the delegate")
        config.update(_FIXED_CONFIG)
        precision = config.pop(PRECISION_SPEC, FP32)
        if precision == INT8:
            config.update(_INT8_CONFIG)
        elif precision != FP32:
            from nativert.passes.lower_precision import lower_precision

            try:
                program = lower_precision(program, TORCH_DTYPES[precision]).program
            except (KeyError, ValueError) as exc:
                raise DelegateCompileError(f"aoti: precision {precision!r}: {exc}") from exc
            config["aot_inductor.use_runtime_constant_folding"] = True
        _segment_device(program)
        if program.example_inputs is None:  # AOTInductor wants them (for its checks)
            program.example_inputs = (_example_inputs(program), {})
        with tempfile.TemporaryDirectory(prefix="nativert-aoti-") as directory:
            path = os.path.join(directory, "segment.pt2")
            try:
                # Outside any caller's tracing (torch.compile lowers under Dynamo's): its
                # fake mode is not this compile's, and constant folding meets real weights.
                # int8: freezing folds weights only where no gradient is recorded.
                grad = torch.no_grad() if precision == INT8 else contextlib.nullcontext()
                with torch._guards.tracing(None), _real_constants_allowed(program), grad:
                    torch._inductor.aoti_compile_and_package(
                        program, package_path=path, inductor_configs=config
                    )
            except Exception as exc:
                raise DelegateCompileError(
                    f"aoti_compile_and_package failed: {type(exc).__name__}: "
                    f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                ) from exc
            if precision == INT8:
                names = weight_names(program)
                digest = weights_digest(names, {n: weight_tensor(program, n) for n in names})
                with zipfile.ZipFile(path, "a") as archive:
                    archive.writestr(_WEIGHTS_DIGEST, digest)
            with open(path, "rb") as f:
                return f.read()

    def load(
        self,
        payload: bytes,
        compile_specs: Sequence[CompileSpec],
        *,
        reference: ExportedProgram,
    ) -> AotiExecutor:
        return AotiExecutor(payload, compile_specs, reference)

"""LoweredBackendModule: a delegated segment, as torch's export verifier knows it.

The class name and the fields `backend_id: str`, `processed_bytes: bytes`,
`compile_specs: list` and `original_module` are what torch's verifier requires of a module
reached by `get_attr` (torch/_export/verifier.py): do not rename them.

A lowered module is data: backend id, payload, compile specs, the segment's reference
program and its weight names. Nothing is loaded when it is made. Its runtime (an ONNX
Runtime session, a loaded .so, an engine) is built on the first dense call through
`call_delegate`, and an `Executor` builds its own with `load_executor()`: one per runner.

A lowered module is called through `call_delegate(lowered, *flat_args)` where `flat_args` are
the segment's placeholders in order: its weights first, then its inputs. Passing weights
explicitly is what lets gradients reach parameters and keeps the reference program weight-free.

Two flavours share one runtime:
- a *view* (`owns_weights=False`): what graphs hold. It has no parameters of its own; the
  program passes the weights. `to_backend(ep, partitioner)` creates these.
- an *owning* module (`owns_weights=True`): what `to_backend("eager", ep)` returns. It
  registers the weights as its parameters and buffers, so calling it runs the program, and a
  wrapper that calls it can be exported or compiled with the weights lifted as usual.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from nativert._program import find_nondifferentiable_outputs, weight_names, weight_tensor
from nativert._program.accuracy import Accuracy
from nativert._program.inputs import InputSpecs
from nativert._program.mapped import release
from nativert.call_delegate import call_delegate
from nativert.delegate import (
    CompileSpec,
    DelegateExecutor,
    ReferenceExecutor,
    get_delegate,
    spec_precision,
)
from nativert.errors import DelegateCallError, DelegateLoadError, NativertError

_EXECUTOR_METHODS = tuple(m for m in vars(DelegateExecutor) if not m.startswith("_"))


class DelegateRuntime:
    """The executor a lowered module's dense calls run on, plus which weights it is bound to.

    Built on the first call. Callers of call_delegate pass weights on every call; the
    executor is (re)initialised only when they are other tensors, or the same tensors changed
    in place (an optimizer step bumps the version counter), so a delegate never runs with
    stale weights.
    """

    def __init__(self, load: Callable[[], DelegateExecutor], names: tuple[str, ...]) -> None:
        self._load = load
        self.weight_names = names
        self._executor: DelegateExecutor | None = None
        self._lock = threading.Lock()
        self._bound_refs: tuple[torch.Tensor, ...] = ()
        self._bound_key: tuple[tuple[int, int], ...] | None = None  # None: rebind

    @staticmethod
    def _key(weights: Sequence[torch.Tensor]) -> tuple[tuple[int, int], ...] | None:
        """Identity and version of each weight; None when a weight is an inference tensor,
        which has no version counter, so an in-place change could not be seen."""
        if any(w.is_inference() for w in weights):
            return None
        return tuple((id(w), w._version) for w in weights)

    def _bind_locked(self, weights: Sequence[torch.Tensor]) -> DelegateExecutor:
        if self._executor is None:
            self._executor = self._load()
        executor = self._executor
        key = self._key(weights)
        if key is None or key != self._bound_key:
            executor.init_weights(dict(zip(self.weight_names, weights, strict=True)))
            release(weights)  # mapped package pages the runtime has copied: not twice
            # Holding the tensors keeps their ids from being reused while bound.
            self._bound_refs = tuple(weights)
            self._bound_key = key
        return executor

    def built(self, weights: Callable[[], Sequence[torch.Tensor]]) -> DelegateExecutor:
        """The executor; if none is built yet, one bound to `weights()`."""
        with self._lock:
            if self._executor is None:
                self._bind_locked(weights())
            return self._executor

    def take(self, weights: Sequence[torch.Tensor]) -> DelegateExecutor | None:
        """Hand over the built executor if it is bound to exactly `weights` (the same
        tensors, unchanged), else None. This runtime builds a new one if it is called again.
        An Executor takes the one lowering built (its trial load) instead of building a
        second session over the same weights."""
        with self._lock:
            key = self._key(weights)
            if self._executor is None or key is None or key != self._bound_key:
                return None
            executor, self._executor = self._executor, None
            self._bound_refs, self._bound_key = (), None
            return executor

    def run(self, flat_args: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        n = len(self.weight_names)
        with self._lock:  # bind and take the snapshot together: callers with other weights
            executor = self._bind_locked(flat_args[:n])  # cannot slip in between
            state = executor.active_state()
        return executor.run_with(state, flat_args[n:])


def _attr_name(target: str, taken: set[str]) -> str:
    base = target.replace(".", "_") or "weight"
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


class LoweredBackendModule(torch.nn.Module):
    """A segment compiled by one delegate. See the module docstring."""

    def __init__(
        self,
        *,
        backend_id: str,
        processed_bytes: bytes,
        compile_specs: Sequence[CompileSpec],
        original_module: ExportedProgram,
        module_name: str,
        owns_weights: bool = False,
        mutated_arg_indices: Sequence[int] = (),
        state_arg_indices: Sequence[int] = (),
        nondifferentiable_outputs: Sequence[int] | None = None,
        reference_reason: str | None = None,
        runtime: DelegateRuntime | None = None,
        accuracy: Accuracy | None = None,
    ) -> None:
        super().__init__()
        self.backend_id = backend_id
        self.processed_bytes = processed_bytes
        self.compile_specs = list(compile_specs)
        self.original_module = original_module
        self.module_name = module_name
        self.owns_weights = owns_weights
        # Arguments the caller mutates after the call (buffers updated in forward): autograd
        # must not save them by reference for backward.
        self.mutated_arg_indices = frozenset(mutated_arg_indices)
        # Set when this segment's delegate cannot run here (a package loaded where its
        # runtime is missing): the reference program runs instead, and this says why.
        self.reference_reason = reference_reason
        # Computed below fp32 (the `precision` compile spec): its measured error against
        # fp32 PyTorch on the example inputs, when lowering measured it.
        self.accuracy = accuracy

        names = weight_names(original_module)
        self.weight_names = names
        self._num_weights = len(names)
        self._num_inputs = sum(
            1
            for spec in original_module.graph_signature.input_specs
            if spec.kind == InputKind.USER_INPUT
        )
        self._input_names = tuple(
            spec.arg.name
            for spec in original_module.graph_signature.input_specs
            if spec.kind == InputKind.USER_INPUT
        )
        self._input_specs: InputSpecs | None = None  # built on the first dense call
        # Shared by this module's views and copies that share its weights; loads nothing yet.
        self._runtime = runtime or DelegateRuntime(self.load_executor, names)
        # Not a registered submodule: a child would show up in parameters() and state_dict().
        object.__setattr__(self, "_view", None)

        # Read once: Dynamo will not trace ExportedProgram properties inside forward.
        self._in_spec = original_module.call_spec.in_spec
        self._out_spec = original_module.call_spec.out_spec
        self._weight_attrs: tuple[str, ...] = ()
        if owns_weights:
            self._register_weights(names)
        # Outputs no input can give a gradient to (batch-norm's new running stats, integer
        # outputs): autograd must mark them so, as eager does, or a buffer updated from them
        # would start requiring grad.
        if nondifferentiable_outputs is None:
            # Buffers and constants are state, not differentiable values, wherever they enter.
            kinds = [spec.kind for spec in original_module.graph_signature.input_specs]
            state = {
                i
                for i, kind in enumerate(kinds[: self._num_weights])
                if kind != InputKind.PARAMETER
            }
            nondifferentiable_outputs = find_nondifferentiable_outputs(
                original_module, self.mutated_arg_indices | state | set(state_arg_indices)
            )
        self.nondifferentiable_outputs = frozenset(nondifferentiable_outputs)

    # -- construction helpers -------------------------------------------------------------
    def _register_weights(self, names: tuple[str, ...]) -> None:
        ep = self.original_module
        kinds = {spec.target: spec.kind for spec in ep.graph_signature.input_specs if spec.target}
        taken: set[str] = set()
        attrs = []
        for target in names:
            attr = _attr_name(target, taken)
            tensor = weight_tensor(ep, target)
            if kinds[target] == InputKind.PARAMETER:
                if not isinstance(tensor, torch.nn.Parameter):
                    tensor = torch.nn.Parameter(tensor, requires_grad=tensor.requires_grad)
                self.register_parameter(attr, tensor)
            else:
                self.register_buffer(attr, tensor)
            attrs.append(attr)
        self._weight_attrs = tuple(attrs)
        outputs = ep.graph_signature.output_specs
        self._buffer_mutations = tuple(
            (i, attrs[names.index(spec.target)])
            for i, spec in enumerate(outputs)
            if spec.kind == OutputKind.BUFFER_MUTATION
        )
        self._input_mutations = tuple(
            (i, self._input_names.index(spec.target))
            for i, spec in enumerate(outputs)
            if spec.kind == OutputKind.USER_INPUT_MUTATION
        )
        self._user_outputs = tuple(
            i for i, spec in enumerate(outputs) if spec.kind == OutputKind.USER_OUTPUT
        )
        self.mutated_arg_indices = frozenset(
            names.index(spec.target) for spec in outputs if spec.kind == OutputKind.BUFFER_MUTATION
        ) | frozenset(self._num_weights + j for _, j in self._input_mutations)

    # -- what graphs hold -----------------------------------------------------------------
    def graph_view(self) -> LoweredBackendModule:
        """The weight-free module to put in a traced graph (self, unless this owns weights)."""
        if not self.owns_weights:
            return self
        if self._view is None:
            object.__setattr__(self, "_view", self._sharing_runtime())
        return self._view

    def _sharing_runtime(self) -> LoweredBackendModule:
        """A weight-free module with this one's payload, reference program and runtime."""
        return LoweredBackendModule(
            backend_id=self.backend_id,
            processed_bytes=self.processed_bytes,
            compile_specs=self.compile_specs,
            original_module=self.original_module,
            module_name=self.module_name,
            owns_weights=False,
            mutated_arg_indices=self.mutated_arg_indices,
            nondifferentiable_outputs=self.nondifferentiable_outputs,
            reference_reason=self.reference_reason,
            runtime=self._runtime,
            accuracy=self.accuracy,
        )

    # -- the runtime -----------------------------------------------------------------------
    def load_executor(self) -> DelegateExecutor:
        """A new executor for this segment (no weights yet): each runner owns its own."""
        if self.reference_reason is not None:
            return ReferenceExecutor(self.original_module, name=self.backend_id)
        delegate = get_delegate(self.backend_id)
        try:
            executor = delegate.load(
                self.processed_bytes, self.compile_specs, reference=self.original_module
            )
        except NativertError:
            raise
        except Exception as exc:  # the runtime's own error, with the segment named
            raise DelegateLoadError(
                f"delegate {self.backend_id!r} could not load segment {self.module_name!r} "
                f"({len(self.processed_bytes)} payload bytes): {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(executor, DelegateExecutor):
            missing = [m for m in _EXECUTOR_METHODS if not hasattr(executor, m)]
            raise NativertError(
                f"delegate {self.backend_id!r}: load() returned a {type(executor).__name__}, "
                f"which lacks {missing} of the DelegateExecutor protocol; derive it from "
                "nativert.StagedWeights"
            )
        return executor

    @property
    def runtime(self) -> DelegateRuntime:
        """The runtime this module's calls (and its views' and copies') run on."""
        return self._runtime

    @property
    def executor(self) -> DelegateExecutor:
        """This module's own executor (what `.module()` calls run on); built on first use,
        bound to the segment's own weights when no call built it first."""
        return self._runtime.built(
            lambda: [weight_tensor(self.original_module, n) for n in self.weight_names]
        )

    @property
    def precision(self) -> str:
        """What the delegate computes in ("fp32" unless a compile spec says otherwise)."""
        return spec_precision(self.compile_specs)

    @property
    def num_weights(self) -> int:
        return self._num_weights

    @property
    def num_flat_args(self) -> int:
        return self._num_weights + self._num_inputs

    def check_arity(self, flat_args: Sequence[Any]) -> None:
        if len(flat_args) != self.num_flat_args:
            raise DelegateCallError(
                f"lowered module {self.module_name!r} (delegate {self.backend_id!r}) takes "
                f"{self.num_flat_args} arguments ({self._num_weights} weights, then inputs "
                f"{list(self._input_names)}), got {len(flat_args)}"
            )

    # -- running ---------------------------------------------------------------------------
    def run_delegate(self, flat_args: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        """Run the delegate on real tensors (weights first, then inputs), after checking the
        inputs against the segment's signature (once per signature)."""
        self.check_arity(flat_args)
        specs = self._input_specs
        if specs is None:
            owner = f"segment {self.module_name!r} (delegate {self.backend_id!r})"
            specs = self._input_specs = InputSpecs(self.original_module, owner=owner)
        specs.validate(flat_args[self._num_weights :])
        return self._runtime.run(flat_args)

    def run_reference(self, flat_args: Sequence[Any]) -> tuple[Any, ...]:
        """Run the segment's reference ATen graph (used for fake tensors and for backward)."""
        self.check_arity(flat_args)
        return tuple(self.original_module.graph_module(*flat_args))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.owns_weights:
            if kwargs:
                raise DelegateCallError(
                    f"lowered module {self.module_name!r} takes flat positional arguments, "
                    f"got keyword arguments {sorted(kwargs)}"
                )
            return call_delegate(self, *args)

        flat_inputs, spec = pytree.tree_flatten((args, kwargs))
        expected_spec = self._in_spec
        if expected_spec is not None and spec != expected_spec:
            raise DelegateCallError(self._structure_error(args, spec))
        weights = [getattr(self, attr) for attr in self._weight_attrs]
        outputs = call_delegate(self, *weights, *flat_inputs)
        if self._buffer_mutations or self._input_mutations:
            with torch.no_grad():
                for i, attr in self._buffer_mutations:
                    getattr(self, attr).copy_(outputs[i])
                for i, j in self._input_mutations:
                    flat_inputs[j].copy_(outputs[i])
        user = [outputs[i] for i in self._user_outputs]
        out_spec = self._out_spec
        return pytree.tree_unflatten(user, out_spec) if out_spec is not None else tuple(user)

    def _structure_error(self, args: tuple, spec: pytree.TreeSpec) -> str:
        """Inputs that do not flatten like the exported ones: name the first argument that
        holds a container where one value was exported (a list), else show both structures."""
        where = f"lowered module {self.module_name!r}"
        expected = self._in_spec
        positional = expected.child(0).children() if expected.num_children else []
        leaf = 0
        for value, child in zip(args, positional, strict=False):
            # A container (a list) where the program takes one value; a numpy array flattens
            # to one leaf, and is caught when the inputs are checked.
            if child.is_leaf() and not pytree.tree_structure(value).is_leaf():
                name = self._input_names[leaf] if leaf < len(self._input_names) else leaf
                return f"{where}: input {name!r} must be a Tensor, got {type(value).__name__}"
            leaf += child.num_leaves

        def short(tree: pytree.TreeSpec) -> str:
            text = " ".join(str(tree).split())
            return text if len(text) <= 200 else text[:200] + " ..."

        return (
            f"{where} expects inputs structured as {short(expected)} ({self._num_inputs} "
            f"tensors: {list(self._input_names)}), got {short(spec)}"
        )

    # -- copying ---------------------------------------------------------------------------
    def __deepcopy__(self, memo: dict[int, Any]) -> LoweredBackendModule:
        """Share payload, reference program and runtime; copy owned weights like any module.

        Graph passes (run_decompositions, Dynamo) deep-copy modules; copying sessions and
        real weights would be slow at best and fail at worst.
        """
        if not self.owns_weights:
            memo[id(self)] = self
            return self
        clone = self._sharing_runtime()
        # Its own runtime: copies with different weights must not rebind one executor in turn.
        runtime = DelegateRuntime(clone.load_executor, self.weight_names)
        clone._runtime = runtime
        memo[id(self)] = clone
        clone.owns_weights = True
        for name, param in self._parameters.items():
            clone.register_parameter(name, copy.deepcopy(param, memo))
        for name, buf in self._buffers.items():
            clone.register_buffer(name, copy.deepcopy(buf, memo))
        for attr in (
            "_weight_attrs",
            "_buffer_mutations",
            "_input_mutations",
            "_user_outputs",
            "_in_spec",
            "_out_spec",
        ):
            setattr(clone, attr, getattr(self, attr))
        clone.mutated_arg_indices = self.mutated_arg_indices
        return clone

    def extra_repr(self) -> str:
        return (
            f"backend_id={self.backend_id!r}, module_name={self.module_name!r}, "
            f"payload={len(self.processed_bytes)} bytes, weights={self._num_weights}, "
            f"inputs={self._num_inputs}"
        )

"""Executor: run a program with delegates fast, from many threads, with hot weight swaps.

Prepared once: the program's graph is copied and every `call_delegate` node becomes a call of
a small runner that hands the segment's inputs straight to its DelegateExecutor: no op
dispatch, no `.module()` wrapper, just FX's generated straight-line Python. (A delegate call
whose weights are not program weights, e.g. a lowered module that torch.compile traced, whose
weights arrive as graph inputs, stays a `call_delegate` op, which binds them per call.)

Weights live in one immutable *generation*: the top-level weight tensors plus each
delegate's committed state. A call reads the generation once and runs entirely on it;
`update_weights` stages every delegate, then publishes a new generation with one assignment.
So a call sees all old or all new weights, and traffic never stops.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx import GraphModule, Node

from nativert._program import WEIGHT_KINDS, weight_tensor
from nativert._program.inputs import InputSpecs
from nativert.backend.runtime.profile import ProfileRow, ProfileTable
from nativert.backend.runtime.weights import validate_update
from nativert.call_delegate import call_delegate
from nativert.errors import NativertError
from nativert.lowered import LoweredBackendModule


@dataclasses.dataclass(frozen=True)
class _Generation:
    weights: tuple[torch.Tensor, ...]  # every weight placeholder's tensor, in order
    states: tuple[Any, ...]  # each delegate's committed state, in delegate order


class _DelegateRunner:
    """Stands in for one call_delegate node: runs this Executor's own delegate executor on
    the call's snapshot. `sources` maps each of the segment's weights to the program weight
    the graph passes for it."""

    def __init__(
        self, index: int, lowered: LoweredBackendModule, sources: tuple[str, ...]
    ) -> None:
        self.index = index
        self.lowered = lowered
        self.names = lowered.weight_names
        self.sources = sources
        self.executor = lowered.load_executor()  # its own: not shared with .module() or others
        self.skip = len(self.names)  # owned weights live in the executor
        self.__name__ = f"delegate_{lowered.module_name}"  # FX codegen names the call by it

    def stage(self, weights: Mapping[str, torch.Tensor]) -> None:
        self.executor.process_weights(
            {name: weights[source] for name, source in zip(self.names, self.sources, strict=True)}
        )

    def __call__(self, states: tuple, *args: Any) -> tuple[torch.Tensor, ...]:
        return self.executor.run_with(states[self.index], args[self.skip :])


class Executor:
    """Runs `program` (an ExportedProgram with or without delegates); see the module docstring.

    `Executor(program)(*args, **kwargs)` takes what `program.module()` takes and returns the
    same outputs. `num_frames` bounds how many calls run at once (default: 2 x CPU count);
    callers beyond it wait until one finishes. A call's state is its own stack frame plus what
    each delegate executor keeps per thread (ONNX Runtime: one IOBinding per thread and input
    signature), so there is no pool of preallocated frames: `num_frames` is a bound, and
    `peak_concurrency` says how many calls ran at once at most.
    """

    def __init__(self, program: ExportedProgram, *, num_frames: int | None = None) -> None:
        if not isinstance(program, ExportedProgram):
            raise TypeError(f"Executor needs an ExportedProgram, got {type(program).__name__}")
        self.program = program
        sig = program.graph_signature
        self._weight_names = tuple(s.target for s in sig.input_specs if s.kind in WEIGHT_KINDS)
        others = [s for s in sig.input_specs if s.kind not in (*WEIGHT_KINDS, InputKind.USER_INPUT)]
        if others:
            raise NativertError(
                f"Executor cannot run inputs of kind {others[0].kind.name} ({others[0].arg.name})"
            )
        self._inputs = InputSpecs(program)
        self._gm, self._runners = self._prepare(program)
        self._out_spec = program.call_spec.out_spec
        outputs = sig.output_specs
        names = list(self._weight_names)
        self._buffer_mutations = tuple(
            (i, names.index(s.target))
            for i, s in enumerate(outputs)
            if s.kind == OutputKind.BUFFER_MUTATION
        )
        user_inputs = [s.arg.name for s in sig.input_specs if s.kind == InputKind.USER_INPUT]
        self._input_mutations = tuple(
            (i, user_inputs.index(s.target))
            for i, s in enumerate(outputs)
            if s.kind == OutputKind.USER_INPUT_MUTATION
        )
        self._user_outputs = tuple(
            i for i, s in enumerate(outputs) if s.kind == OutputKind.USER_OUTPUT
        )
        weights = {n: weight_tensor(program, n) for n in self._weight_names}
        for _, j in self._buffer_mutations:
            # State this Executor updates is its own: the program and other Executors keep
            # theirs.
            name = self._weight_names[j]
            weights[name] = weights[name].detach().clone()
        for runner in self._runners:
            runner.stage(weights)
            runner.executor.commit_weights()
        self._gen = _Generation(
            tuple(weights[n] for n in self._weight_names),
            tuple(r.executor.active_state() for r in self._runners),
        )
        # Required in a strict update: what the program's state_dict holds (parameters and
        # persistent buffers); constants and non-persistent buffers may be given or not.
        self._required = frozenset(program.state_dict)
        # The generated code itself: nn.Module.__call__ adds hook handling we do not need.
        self._forward = self._gm.forward
        self._pack = self._make_pack()
        self._update_lock = threading.Lock()
        if num_frames is not None and num_frames < 1:
            raise NativertError(f"num_frames must be >= 1, got {num_frames}")
        self._max_frames = num_frames or 2 * (os.cpu_count() or 1)
        self._frames = threading.BoundedSemaphore(self._max_frames)
        self._frames_lock = threading.Lock()
        self._busy = 0
        self._peak = 0

    # -- preparation -----------------------------------------------------------------------
    def _prepare(self, program: ExportedProgram) -> tuple[GraphModule, list[_DelegateRunner]]:
        gm = copy.deepcopy(program.graph_module)
        graph = gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        with graph.inserting_after(placeholders[-1] if placeholders else None):
            states = graph.placeholder("nativert_delegate_states")
        targets = {
            s.arg.name: s.target
            for s in program.graph_signature.input_specs
            if s.kind in WEIGHT_KINDS
        }
        runners = []
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not call_delegate:
                continue
            lowered = getattr(gm, node.args[0].target)
            passed = node.args[1 : 1 + lowered.num_weights]
            if any(getattr(a, "name", None) not in targets for a in passed):
                # Its weights are inputs or computed (a lowered module traced by
                # torch.compile): the call_delegate op binds them per call.
                continue
            runner = _DelegateRunner(len(runners), lowered, tuple(targets[a.name] for a in passed))
            runners.append(runner)
            with graph.inserting_before(node):
                direct = graph.call_function(runner, (states, *node.args[1:]))
            direct.meta = dict(node.meta)
            node.replace_all_uses_with(direct)
            graph.erase_node(node)
        graph.eliminate_dead_code()  # the get_attr nodes of the lowered modules
        gm.recompile()
        return gm, runners

    # -- running ---------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._pack(self.run_flat(self._inputs.flatten(args, kwargs)))

    def run_flat(self, flat: Sequence[Any]) -> tuple[Any, ...]:
        """Run on the flat user inputs, in placeholder order, without checking them (callers
        that guard inputs themselves, like torch.compile); return every graph output."""
        gen = self._gen  # one snapshot for the whole call
        self._frames.acquire()
        try:
            with self._frames_lock:
                self._busy += 1
                if self._busy > self._peak:
                    self._peak = self._busy
            outputs = self._forward(*gen.weights, *flat, gen.states)
        finally:
            with self._frames_lock:
                self._busy -= 1
            self._frames.release()
        if self._buffer_mutations or self._input_mutations:
            with torch.no_grad():
                for i, j in self._buffer_mutations:
                    gen.weights[j].copy_(outputs[i])
                for i, j in self._input_mutations:
                    flat[j].copy_(outputs[i])
        return outputs

    def _make_pack(self):
        """Outputs -> the user's structure; plain tuples and single tensors skip pytree."""
        picks, spec = self._user_outputs, self._out_spec
        if spec is not None and spec.is_leaf() and len(picks) == 1:
            (i,) = picks
            return lambda outputs: outputs[i]
        flat_tuple = pytree.tree_flatten(tuple(range(len(picks))))[1]
        if spec == flat_tuple:
            return lambda outputs: tuple(outputs[i] for i in picks)
        return lambda outputs: pytree.tree_unflatten([outputs[i] for i in picks], spec)

    @property
    def num_frames(self) -> int:
        """The most calls that may run at once (the bound given, or the default)."""
        return self._max_frames

    @property
    def peak_concurrency(self) -> int:
        """The most calls that have run at once so far (at most `num_frames`)."""
        return self._peak

    # -- weights ---------------------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        """The current weights, by name (the tensors in use, not copies)."""
        return dict(zip(self._weight_names, self._gen.weights, strict=True))

    def update_weights(self, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True):
        """Swap in new weights for the program and every delegate, all at once.

        Validates names, shapes and dtypes, stages every affected delegate
        (`process_weights`), and only if all succeed commits them and publishes the new
        generation. Any failure commits nothing and raises. Calls in flight finish on the
        weights they started with. With `strict=False`, names not given keep their weights.
        Returns the (missing, unexpected) names, like `load_state_dict`.
        """
        with self._update_lock:
            current = self.weights()
            missing, unexpected = validate_update(
                current, state_dict, strict=strict, required=self._required
            )
            new = {**current, **{k: v for k, v in state_dict.items() if k in current}}
            staged = []
            try:
                for runner in self._runners:
                    if any(source in state_dict for source in runner.sources):
                        runner.stage(new)
                        staged.append(runner)
            except Exception:
                for runner in staged:
                    runner.executor.discard_weights()
                raise
            for runner in staged:
                runner.executor.commit_weights()
            self._gen = _Generation(
                tuple(new[n] for n in self._weight_names),
                tuple(r.executor.active_state() for r in self._runners),
            )
            return missing, unexpected

    # -- profiling -------------------------------------------------------------------------
    def profile(self, *args: Any, warmup: int = 3, runs: int = 20, **kwargs: Any) -> ProfileTable:
        """Median time per node (and per delegate call) over `runs` calls, after `warmup`."""
        flat = self._inputs.flatten(args, kwargs)
        gen = self._gen
        samples: dict[Node, list[float]] = {}

        class Timed(torch.fx.Interpreter):
            def run_node(self, n: Node) -> Any:
                start = time.perf_counter()
                result = super().run_node(n)
                if n.op == "call_function":
                    samples.setdefault(n, []).append(time.perf_counter() - start)
                return result

        with torch.no_grad():
            for i in range(warmup + runs):
                if i == warmup:
                    samples.clear()
                Timed(self._gm).run(*gen.weights, *flat, gen.states)
        table = ProfileTable()
        for node, times in samples.items():
            times.sort()
            delegate = (
                node.target.lowered.backend_id if isinstance(node.target, _DelegateRunner) else None
            )
            table.append(
                ProfileRow(node.name, str(node.target), delegate, times[len(times) // 2] * 1e6)
            )
        return table

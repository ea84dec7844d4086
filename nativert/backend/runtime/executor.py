"""Executor: run a program with delegates fast, from many threads, with hot weight swaps.

Prepared once: the program's graph is copied and every `call_delegate` node becomes a call of
a small runner that hands the segment's inputs straight to its DelegateExecutor: no op
dispatch, no `.module()` wrapper, just FX's generated straight-line Python. (A delegate call
whose weights are not program weights, e.g. a lowered module that torch.compile traced, whose
weights arrive as graph inputs, stays a `call_delegate` op, which binds them per call.)
Effect tokens go as `.module()` drops them: effectful ops are called directly (tokens.py).

Weights live in one immutable *generation*: the top-level weight tensors plus each
delegate's committed state. A call reads the generation once and runs entirely on it;
`update_weights` stages every delegate, then publishes a new generation with one assignment.
So a call sees all old or all new weights, and traffic never stops.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import queue
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
from nativert._program.mapped import release
from nativert.backend.runtime.memory import return_freed_memory
from nativert.backend.runtime.profile import ProfileRow, ProfileTable
from nativert.backend.runtime.tokens import remove_effect_tokens
from nativert.backend.runtime.weights import validate_update
from nativert.call_delegate import call_delegate
from nativert.delegate import DelegateExecutor
from nativert.errors import NativertError, WeightsError
from nativert.lowered import LoweredBackendModule


@dataclasses.dataclass(frozen=True)
class _Generation:
    weights: tuple[torch.Tensor, ...]  # every weight's tensor, in signature order
    states: tuple[Any, ...]  # each delegate's committed state, in delegate order
    graph_weights: tuple[torch.Tensor, ...]  # those the prepared graph still reads
    version: int  # which weights these are: 0 as loaded, then one more per commit


@dataclasses.dataclass(frozen=True)
class _Staged:
    weights: dict[str, torch.Tensor]
    runners: tuple[_DelegateRunner, ...]
    version: int


class _DelegateRunner:
    """Stands in for one call_delegate node: runs this Executor's own delegate executor on
    the call's snapshot. `sources` maps each of the segment's weights to the program weight
    the call_delegate node passed for it (the runner is called with the inputs alone)."""

    def __init__(self, index: int, lowered: LoweredBackendModule, sources: tuple[str, ...]) -> None:
        self.index = index
        self.lowered = lowered
        self.names = lowered.weight_names
        self.sources = sources
        self.executor: DelegateExecutor | None = None  # set by bind
        self.__name__ = f"delegate_{lowered.module_name}"  # FX codegen names the call by it

    def bind(self, weights: Mapping[str, torch.Tensor]) -> None:
        """This runner's own executor, bound to `weights`: the one the lowered module built
        (lowering's trial load, or `.module()` calls) when it is bound to these very
        tensors, which the module hands over; else a new one. Never shared: `.module()`
        calls after this build their own."""
        mine = [weights[source] for source in self.sources]
        self.executor = self.lowered.runtime.take(mine)
        if self.executor is None:
            self.executor = self.lowered.load_executor()
            self.stage(weights)
            self.executor.commit_weights()

    def stage(self, weights: Mapping[str, torch.Tensor]) -> None:
        self.executor.process_weights(
            {name: weights[source] for name, source in zip(self.names, self.sources, strict=True)}
        )

    def __call__(self, states: tuple, *inputs: Any) -> tuple[torch.Tensor, ...]:
        # The graph passes only the segment's inputs: its weights live in the executor.
        return self.executor.run_with(states[self.index], inputs)


class Executor:
    """Runs `program` (an ExportedProgram with or without delegates); see the module docstring.

    `Executor(program)(*args, **kwargs)` takes what `program.module()` takes and returns the
    same outputs. `num_frames` bounds how many calls run at once (default: 2 x CPU count);
    callers beyond it wait until one finishes. A call's state is its own stack frame plus what
    each delegate executor keeps per thread (ONNX Runtime: one IOBinding per thread and input
    signature, with the output buffers it has bound), so there is no pool of preallocated
    frames: `num_frames` is a bound, and `peak_concurrency` says how many calls ran at once at
    most. Outputs are the caller's own: a delegate reuses an output's memory only after every
    tensor that could see it is gone.
    """

    def __init__(self, program: ExportedProgram, *, num_frames: int | None = None) -> None:
        if not isinstance(program, ExportedProgram):
            raise TypeError(f"Executor needs an ExportedProgram, got {type(program).__name__}")
        self.program = program
        sig = program.graph_signature
        self._weight_names = tuple(s.target for s in sig.input_specs if s.kind in WEIGHT_KINDS)
        runnable = (*WEIGHT_KINDS, InputKind.USER_INPUT, InputKind.TOKEN)
        others = [s for s in sig.input_specs if s.kind not in runnable]
        if others:
            raise NativertError(
                f"Executor cannot run inputs of kind {others[0].kind.name} ({others[0].arg.name})"
            )
        self._inputs = InputSpecs(program)
        self._gm, self._runners, read = self._prepare(program)
        self._graph_weights = tuple(self._weight_names.index(name) for name in read)
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
            runner.bind(weights)
        self._gen = self._generation(weights, 0)
        # Weights of a loaded package that only delegates read: their runtimes hold them
        # now, so this process need not hold the mapped pages too.
        graph_read = {self._weight_names[i] for i in self._graph_weights}
        release(weights[n] for n in self._weight_names if n not in graph_read)
        self._staged: _Staged | None = None
        # Required in a strict update: what the program's state_dict holds (parameters and
        # persistent buffers); constants and non-persistent buffers may be given or not.
        self._required = frozenset(program.state_dict)
        # The generated code itself: nn.Module.__call__ adds hook handling we do not need.
        self._forward = self._gm.forward
        self._pack = self._make_pack()
        self._mutates = bool(self._buffer_mutations or self._input_mutations)
        # Reentrant: update_weights holds it across stage_weights and commit_weights.
        self._update_lock = threading.RLock()
        if num_frames is not None and num_frames < 1:
            raise NativertError(f"num_frames must be >= 1, got {num_frames}")
        self._max_frames = num_frames or 2 * (os.cpu_count() or 1)
        # One token per frame: a C queue, where threading.Semaphore is Python code under a
        # Condition (0.1 us a call against 1.1 us). A call takes a token or waits for one.
        self._frames: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(self._max_frames):
            self._frames.put(None)
        self._peak_lock = threading.Lock()
        self._peak = 0

    def _generation(self, weights: Mapping[str, torch.Tensor], version: int) -> _Generation:
        """The weights and every delegate's active state, as one snapshot."""
        ordered = tuple(weights[n] for n in self._weight_names)
        return _Generation(
            ordered,
            tuple(r.executor.active_state() for r in self._runners),
            tuple(ordered[i] for i in self._graph_weights),
            version,
        )

    # -- preparation -----------------------------------------------------------------------
    def _prepare(
        self, program: ExportedProgram
    ) -> tuple[GraphModule, list[_DelegateRunner], list[str]]:
        """The graph with direct delegate calls, its runners, and the weights it still reads
        (its weight placeholders, in order: those only delegates read are gone)."""
        gm = copy.deepcopy(program.graph_module)
        graph = gm.graph
        sig = program.graph_signature
        token_inputs = {s.arg.name for s in sig.input_specs if s.kind == InputKind.TOKEN}
        token_outputs = [i for i, s in enumerate(sig.output_specs) if s.kind == OutputKind.TOKEN]
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        # After the last placeholder; before everything in a program without inputs
        # (inserting_after(None) would append it after the output).
        with (
            graph.inserting_after(placeholders[-1])
            if placeholders
            else graph.inserting_before(next(iter(graph.nodes)))
        ):
            states = graph.placeholder("nativert_delegate_states")
        targets = {s.arg.name: s.target for s in sig.input_specs if s.kind in WEIGHT_KINDS}
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
                # The segment's weights live in its executor: pass only its inputs.
                inputs = node.args[1 + lowered.num_weights :]
                direct = graph.call_function(runner, (states, *inputs))
            direct.meta = dict(node.meta)
            node.replace_all_uses_with(direct)
            graph.erase_node(node)
        graph.eliminate_dead_code()  # the get_attr nodes of the lowered modules
        if token_inputs or token_outputs:
            # After DCE: the effectful calls it leaves return nothing anyone reads.
            remove_effect_tokens(graph, token_inputs, token_outputs)
        read = []
        for node in placeholders:
            if node.name in targets:
                if node.users:
                    read.append(targets[node.name])
                else:  # read by delegates only: one argument less to pass per call
                    graph.erase_node(node)
        gm.recompile()
        return gm, runners, read

    # -- running ---------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._pack(self.run_flat(self._inputs.flatten(args, kwargs)))

    def call_versioned(self, *args: Any, **kwargs: Any) -> tuple[Any, int]:
        """`(outputs, weights_version)`: what `executor(*args, **kwargs)` returns, and the
        version of the weights that computed it (a server reports it with the result)."""
        gen = self._gen  # read once: the version is the one the call ran on
        return self._pack(self._run(self._inputs.flatten(args, kwargs), gen)), gen.version

    def run_flat(self, flat: Sequence[Any]) -> tuple[Any, ...]:
        """Run on the flat user inputs, in placeholder order, without checking them (callers
        that guard inputs themselves, like torch.compile); return every graph output."""
        return self._run(flat, self._gen)  # one snapshot for the whole call

    def _run(self, flat: Sequence[Any], gen: _Generation) -> tuple[Any, ...]:
        frames = self._frames
        frames.get()
        try:
            # The tokens out right now, this call's among them: a true count at one instant.
            busy = self._max_frames - frames.qsize()
            if busy > self._peak:
                self._raise_peak(busy)
            outputs = self._forward(*gen.graph_weights, *flat, gen.states)
        finally:
            frames.put(None)
        if self._mutates:
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

    def _raise_peak(self, busy: int) -> None:
        with self._peak_lock:  # rare: only when a new peak is seen
            self._peak = max(self._peak, busy)

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

    @property
    def weights_version(self) -> int:
        """The version of the weights new calls run on: 0 as built, then the version each
        commit gave (by default one more than the last)."""
        return self._gen.version

    def update_weights(
        self,
        state_dict: Mapping[str, torch.Tensor],
        *,
        strict: bool = True,
        version: int | None = None,
    ):
        """Swap in new weights for the program and every delegate, all at once.

        Validates names, shapes and dtypes, stages every affected delegate
        (`process_weights`), and only if all succeed commits them and publishes the new
        generation. Any failure commits nothing and raises. Calls in flight finish on the
        weights they started with. With `strict=False`, names not given keep their weights.
        Returns the (missing, unexpected) names, like `load_state_dict`. The new weights get
        `version` (default: the current version + 1). The same as `stage_weights` then
        `commit_weights`, which several Executors (a fleet of servers) use to switch together.
        """
        with self._update_lock:
            result = self.stage_weights(state_dict, strict=strict, version=version)
            self.commit_weights()
            return result

    def stage_weights(
        self,
        state_dict: Mapping[str, torch.Tensor],
        *,
        strict: bool = True,
        version: int | None = None,
    ) -> tuple[list[str], list[str]]:
        """Phase one of `update_weights`: validate and stage every affected delegate, without
        switching. Calls keep running on the current weights until `commit_weights`;
        `discard_weights` drops what was staged. One update may be staged at a time."""
        with self._update_lock:
            if self._staged is not None:
                raise WeightsError(
                    f"weights version {self._staged.version} are staged already: commit or "
                    "discard them before staging others"
                )
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
            self._staged = _Staged(
                new, tuple(staged), self._gen.version + 1 if version is None else version
            )
            return missing, unexpected

    def commit_weights(self) -> int:
        """Phase two: switch every staged delegate and publish the staged weights to new
        calls, at once; return their version."""
        with self._update_lock:
            staged = self._staged
            if staged is None:
                raise WeightsError("commit_weights: nothing is staged (call stage_weights first)")
            for runner in staged.runners:
                runner.executor.commit_weights()
            self._gen = self._generation(staged.weights, staged.version)
            self._staged = None
            return_freed_memory()  # the old weights, unless a call still runs on them
            return self._gen.version

    def discard_weights(self) -> None:
        """Drop staged weights (if any): the current ones stay."""
        with self._update_lock:
            staged, self._staged = self._staged, None
            if staged is not None:
                for runner in staged.runners:
                    runner.executor.discard_weights()

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
                Timed(self._gm).run(*gen.graph_weights, *flat, gen.states)
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

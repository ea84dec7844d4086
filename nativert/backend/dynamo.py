"""`torch.compile(model, backend="nativert")`: Dynamo graphs through our delegates.

Dynamo hands the backend one FX graph per traced region (a graph break makes several).
aot_autograd turns each into functional core ATen with parameters lifted to inputs: one
*forward* and one *backward* graph when something requires grad, one *inference* graph
otherwise. Each of those goes through what `to_backend` uses: the pass pipeline, the
capability partitioner, the shared lowering step (with the on-disk payload cache) and the
Executor, which runs it. aot_autograd keeps the autograd bookkeeping (saved activations,
input mutations such as batch-norm running stats), so training works with both graphs
delegated.

Settings come from `torch.compile(..., options={...})` and are validated into
`CompileOptions`. What each compile did (regions, fallbacks, cache hits, time) is in
`last_compile_report()`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node

from nativert.backend.cache import DEFAULT as _DEFAULT
from nativert.backend.delegate import list_delegates
from nativert.errors import DelegateCompileError, NativertError

logger = logging.getLogger("nativert")


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """Settings of the torch.compile backend (`options={...}` keys).

    delegates: backend ids in priority order (default: every available fast delegate).
    min_block_size: regions with fewer compute nodes stay in PyTorch.
    exclude_ops: ops ("aten::name" or OpOverload) that always stay in PyTorch.
    strict: a delegate that fails to compile a region raises instead of leaving it in PyTorch.
    cache_dir: where compiled payloads are cached ("default": $NATIVERT_CACHE_DIR, else
        ~/.cache/nativert; None: no cache).
    num_threads: intra-op threads of each ONNX Runtime session (default: torch's).
    autotune: reserved; True raises NotImplementedError.
    """

    delegates: tuple[str, ...] | None = None
    min_block_size: int = 1
    exclude_ops: tuple[Any, ...] = ()
    strict: bool = False
    cache_dir: str | None = _DEFAULT
    num_threads: int | None = None
    autotune: bool = False

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> CompileOptions:
        """Validate torch.compile's `options` dict; unknown keys and bad values raise."""
        if options is None:
            return cls()
        if isinstance(options, CompileOptions):
            return options
        if not isinstance(options, Mapping):
            raise NativertError(
                f"torch.compile(backend='nativert') options must be a dict, got "
                f"{type(options).__name__}"
            )
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise NativertError(f"unknown nativert option(s) {unknown}; valid options: {valid}")
        values = dict(options)
        delegates = values.get("delegates")
        if delegates is not None:
            if isinstance(delegates, str) or not all(isinstance(d, str) for d in delegates):
                raise NativertError(
                    f"option delegates must be a list of backend ids, got {delegates!r}"
                )
            from nativert.backend.delegate import get_delegate

            for backend_id in delegates:
                get_delegate(backend_id)  # unknown id: the error lists the known ones
            values["delegates"] = tuple(delegates)
        _check_int(values, "min_block_size", minimum=1)
        _check_int(values, "num_threads", minimum=1, optional=True)
        for key in ("strict", "autotune"):
            if key in values and not isinstance(values[key], bool):
                raise NativertError(f"option {key} must be True or False, got {values[key]!r}")
        exclude = values.get("exclude_ops", ())
        if isinstance(exclude, str):
            raise NativertError(
                f"option exclude_ops must be a list of ops, got the string {exclude!r}; "
                f"write [{exclude!r}]"
            )
        values["exclude_ops"] = tuple(exclude)
        cache_dir = values.get("cache_dir", _DEFAULT)
        if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
            raise NativertError(
                f"option cache_dir must be a path or None (no cache), got {cache_dir!r}"
            )
        values["cache_dir"] = None if cache_dir is None else os.fspath(cache_dir)
        settings = cls(**values)
        if settings.autotune:
            raise NotImplementedError(
                "nativert option autotune=True is reserved and not built yet; leave it False"
            )
        return settings

    def cache(self):
        from nativert.backend.cache import payload_cache

        return payload_cache(self.cache_dir)


def _check_int(values: dict, key: str, *, minimum: int, optional: bool = False) -> None:
    if key not in values or (optional and values[key] is None):
        return
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise NativertError(f"option {key} must be an int >= {minimum}, got {value!r}")


# -- reports ------------------------------------------------------------------------------
@dataclasses.dataclass
class GraphCompile:
    """One aot_autograd graph (forward, backward or inference) as nativert compiled it."""

    kind: str
    report: Any  # DelegationReport
    program: Any  # the delegated ExportedProgram the Executor runs
    fallbacks: list[str]
    seconds: float
    cache_hits: int
    cache_misses: int


@dataclasses.dataclass
class CompileReport:
    """What the backend did with one Dynamo graph: its aot graphs, fallbacks and cache use.

    The backward graph is compiled when the first backward runs, so it appears then.
    """

    graph_id: int
    options: CompileOptions
    graphs: list[GraphCompile] = dataclasses.field(default_factory=list)

    @property
    def fallbacks(self) -> list[str]:
        return [f for g in self.graphs for f in g.fallbacks]

    @property
    def cache_hits(self) -> int:
        return sum(g.cache_hits for g in self.graphs)

    @property
    def cache_misses(self) -> int:
        return sum(g.cache_misses for g in self.graphs)

    @property
    def seconds(self) -> float:
        return sum(g.seconds for g in self.graphs)

    def __str__(self) -> str:
        lines = [
            f"nativert torch.compile graph {self.graph_id}: {len(self.graphs)} aot graph(s), "
            f"{self.seconds:.2f} s, cache {self.cache_hits} hit(s) / {self.cache_misses} miss(es)"
        ]
        for graph in self.graphs:
            lines.append(f"-- {graph.kind} ({graph.seconds:.2f} s)")
            lines.append(str(graph.report))
            lines += [f"  fallback: {f}" for f in graph.fallbacks]
        return "\n".join(lines)


_reports: list[CompileReport] = []
_reports_lock = threading.Lock()
_graph_ids = itertools.count()
_MAX_REPORTS = 64
_warned: set[str] = set()


def last_compile_report() -> CompileReport | None:
    """The report of the Dynamo graph nativert compiled last in this process (None if none)."""
    with _reports_lock:
        return _reports[-1] if _reports else None


def compile_reports() -> list[CompileReport]:
    """Reports of the Dynamo graphs compiled in this process, oldest first (the last 64)."""
    with _reports_lock:
        return list(_reports)


def _new_report(settings: CompileOptions) -> CompileReport:
    report = CompileReport(next(_graph_ids), settings)
    with _reports_lock:
        _reports.append(report)
        del _reports[:-_MAX_REPORTS]
    return report


# -- the backend --------------------------------------------------------------------------
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

    settings = CompileOptions.from_options(options)
    report = _new_report(settings)
    weights = _module_weights(gm, example_inputs)
    compilers = {
        f"{kind}_compiler": functools.partial(
            _compile_aten,
            kind=kind,
            settings=settings,
            report=report,
            weights=weights if kind == "inference" else {},
        )
        for kind in ("fw", "bw", "inference")
    }
    return aot_autograd(
        **compilers,
        partition_fn=min_cut_rematerialization_partition,
        decompositions=_decompositions(settings.delegates, training=_needs_grad(example_inputs)),
    )(gm, example_inputs)


def _decompositions(delegates: tuple[str, ...] | None, *, training: bool) -> dict:
    """Core ATen decompositions, minus the ops a candidate delegate wants kept whole.

    (Composite-implicit ops such as linear decompose while aot_autograd traces, whatever the
    table says; torch.export.default_decompositions would only add them, at a cost.)"""
    backend_ids = tuple(delegates or list_delegates(available_only=True))
    return _decomposition_table(backend_ids, training)


# torch 2.13's decomposition of CPU flash attention returns the attention weights where the
# op returns logsumexp. Only the backward reads that output, so inference may decompose it
# (delegates then see plain matmuls and softmax), but training must keep the op whole or its
# gradients are wrong (found by tests/backend/test_dynamo.py's transformer training test).
_WRONG_FOR_TRAINING = (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,)


@functools.cache
def _decomposition_table(backend_ids: tuple[str, ...], training: bool) -> dict:
    from torch._decomp import core_aten_decompositions, get_decompositions

    from nativert.backend.delegate import get_delegate

    table = dict(core_aten_decompositions())
    for backend_id in backend_ids:
        for op in get_delegate(backend_id).ops_to_preserve():
            table.pop(op, None)
    if training:
        for op in _WRONG_FOR_TRAINING:
            table.pop(op, None)
        # Training saves layer norm's mean and rstd for the backward; as one node its extra
        # outputs cannot leave an ONNX segment (the exporter drops them), as plain ops they
        # can, so the whole forward stays delegable.
        table.update(get_decompositions(_TRAINING_DECOMPOSITIONS))
    return table


_TRAINING_DECOMPOSITIONS = (torch.ops.aten.native_layer_norm.default,)


def _needs_grad(example_inputs: Sequence[Any]) -> bool:
    """Whether aot_autograd will build a backward graph (as it decides: grad mode on and some
    input, parameters included, requiring grad)."""
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs
    )


_KINDS = {"fw": "forward", "bw": "backward", "inference": "inference"}


def _compile_aten(
    gm: GraphModule,
    example_inputs: Sequence[Any],
    *,
    kind: str,
    settings: CompileOptions,
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

    from nativert.backend.executor import Executor
    from nativert.backend.lowering import lower_tagged_program
    from nativert.backend.to_backend import prepare_program
    from nativert.partitioner.capability import CapabilityPartitioner
    from nativert.partitioner.report import delegation_report

    start = time.perf_counter()
    weights = _unmutated(weights, len(example_inputs))
    program, template, order = _program_from_aten(gm, example_inputs, weights)
    partitioner = CapabilityPartitioner(
        settings.delegates,
        min_block_size=settings.min_block_size,
        exclude_ops=settings.exclude_ops,
        compile_specs=_compile_specs(settings),
    )
    candidates = partitioner.delegates or list_delegates(available_only=True)
    program = prepare_program(program, candidates, passes=None, decompose=False)
    _pin_output_views_of_inputs(program.graph_module)
    result = partitioner.partition(program)
    cache = settings.cache()
    fallbacks: list[str] = []

    def on_fallback(exc: DelegateCompileError) -> None:
        message = f"{exc}; the region stays in PyTorch (strict=True raises instead)"
        fallbacks.append(str(exc))
        if message not in _warned:  # once per process, not once per recompile
            _warned.add(message)
            logger.warning("%s", message)

    # aot_autograd calls us under its fake mode; delegates get real weights.
    with unset_fake_temporarily():
        lowered = lower_tagged_program(
            result.tagged_program,
            result.tags,
            strict=settings.strict,
            cache=cache,
            on_fallback=on_fallback,
        )
        _relax_views(lowered.graph_module)
        executor = Executor(lowered)
    report.graphs.append(
        GraphCompile(
            kind=_KINDS[kind],
            report=delegation_report(lowered),
            program=lowered,
            fallbacks=fallbacks,
            seconds=time.perf_counter() - start,
            cache_hits=cache.stats.hits if cache else 0,
            cache_misses=cache.stats.misses if cache else 0,
        )
    )
    run = _runner(executor, order, weights)
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

    compiled._boxed_call = True  # aot_autograd passes one list it may free (boxed)
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


def _module_weights(gm: GraphModule, example_inputs: Sequence[Any]) -> dict:
    """Dynamo input index -> (name, tensor) for inputs that are module parameters or buffers
    (Dynamo lifts them to inputs; their source says where they came from)."""
    import re

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return {}
    weights = {}
    for i, (node, value) in enumerate(zip(placeholders, example_inputs, strict=True)):
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        name = source.name if source is not None else ""
        name = name() if callable(name) else name
        if not isinstance(value, torch.Tensor) or not re.search(r"\._(parameters|buffers)\[", name):
            continue
        keys = [k for k in re.findall(r"\['([^']*)'\]", name) if k != "self"]
        weights[i] = (".".join(keys) or node.name, value)
    return weights


def _unmutated(weights: Mapping[int, tuple[str, torch.Tensor]], count: int) -> dict:
    """Drop weights the graph mutates (they change every call: inputs, not weights), and all
    of them if aot_autograd's view of the inputs does not line up with Dynamo's."""
    if not weights:
        return {}
    from torch._guards import TracingContext

    context = TracingContext.try_get()
    metadata = getattr(context, "fw_metadata", None)
    infos = getattr(metadata, "input_info", None)
    if infos is None or len(infos) != count:
        return {}
    return {
        i: w for i, w in weights.items() if not (infos[i].mutates_data or infos[i].mutates_metadata)
    }


def _compile_specs(settings: CompileOptions) -> dict[str, dict[str, Any]]:
    if settings.num_threads is None:
        return {}
    return {"onnxruntime": {"intra_op_num_threads": settings.num_threads}}


def _program_from_aten(
    gm: GraphModule,
    example_inputs: Sequence[Any],
    weights: Mapping[int, tuple[str, torch.Tensor]],
):
    """An ExportedProgram over a copy of an aot graph: `weights` (by input index) become
    its parameters, moved first as ExportedProgram wants; the rest are user inputs. Also
    returns the template of outputs and the input order (original indices, program order).

    aot graphs may return constants (None for inputs without gradient, plain ints); those
    leave the program's outputs and come back through the template: one entry per original
    output, None for "the next program output" or a 1-tuple holding the constant.
    """
    import copy

    from torch._export.verifier import Verifier
    from torch._guards import detect_fake_mode
    from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

    from nativert._program import program_from_graph

    gm = copy.deepcopy(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    order = sorted(range(len(placeholders)), key=lambda i: (i not in weights, i))
    users = [placeholders[i] for i in order if i not in weights]
    if weights and users:
        anchor = users[0]  # every weight moves before the first user input, in order
        for i in order:
            if i in weights:
                anchor.prepend(placeholders[i])
        gm.graph.lint()
        gm.recompile()
    output = gm.graph.output_node()
    (values,) = output.args
    template: list[tuple[Any] | None] | None = None
    if not all(isinstance(v, Node) for v in values):
        template = [None if isinstance(v, Node) else (v,) for v in values]
        output.args = (tuple(v for v in values if isinstance(v, Node)),)
        gm.recompile()

    ranges = {}
    fake_mode = detect_fake_mode(example_inputs)
    shape_env = getattr(fake_mode, "shape_env", None)
    if shape_env is not None:
        for node in gm.graph.nodes:
            if node.op != "placeholder":
                continue
            val = node.meta.get("val")
            dims = val.shape if isinstance(val, torch.Tensor) else [val]
            for dim in dims:
                if isinstance(dim, torch.SymInt):
                    for symbol in dim.node.expr.free_symbols:
                        if symbol in shape_env.var_to_range:
                            ranges[symbol] = shape_env.var_to_range[symbol]
    specs = [
        InputSpec(
            InputKind.PARAMETER
            if isinstance(weights[i][1], torch.nn.Parameter)
            else InputKind.BUFFER,
            TensorArgument(placeholders[i].name),
            weights[i][0],
            persistent=None if isinstance(weights[i][1], torch.nn.Parameter) else True,
        )
        for i in order
        if i in weights
    ]
    tensors = dict(weights.values())
    program = program_from_graph(gm, specs, tensors, range_constraints=ranges, verifiers=[Verifier])
    return program, template, order


def _is_view(node: Node) -> bool:
    """An op whose output aliases its first input (per its schema), or a getitem of one."""
    import operator

    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        source = node.args[0]
        return isinstance(source, Node) and _is_view(source)
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns:
        return False
    alias = schema.returns[0].alias_info
    return alias is not None and not alias.is_write


def _pin_output_views_of_inputs(gm: GraphModule) -> None:
    """Keep in PyTorch the view chains that take an input to an output.

    aot_autograd rebuilds such an output from the input with the strides the compiled graph
    returned (as_strided on the input), so it must be a real view: a delegate would return a
    contiguous copy, and the rebuilt alias would read the wrong elements.
    """
    from nativert.partitioner.base import PIN_KEY

    for value in gm.graph.output_node().args[0]:
        chain = []
        node = value
        while isinstance(node, Node) and _is_view(node):
            chain.append(node)
            node = node.args[0]
        if chain and isinstance(node, Node) and node.op == "placeholder":
            for view in chain:
                view.meta[PIN_KEY] = "a view of an input returned as an output (must alias it)"


def _relax_views(gm: GraphModule) -> None:
    """`view` -> `reshape` for views left in PyTorch that no output returns.

    aot graphs record views that are valid for the strides PyTorch's kernels produce while
    tracing. Delegates return contiguous tensors, and some kernels' real strides differ from
    their fake ones, so a view can fail at run time on a tensor of the right shape. reshape
    is the same view when one exists and copies otherwise; graphs here are functional, so
    the values are the same. Views an output returns stay views (aliasing is observable).
    """
    aten = torch.ops.aten
    outputs = set(gm.graph.output_node().args[0])
    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.view.default and node not in outputs:
            node.target = aten.reshape.default
            changed = True
    if changed:
        gm.recompile()

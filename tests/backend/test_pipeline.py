"""The one pipeline (decompose -> passes -> partition -> lower), and its clear errors for bad
partitioners and bad partition results."""

from __future__ import annotations

import pytest
import torch

import nativert
from nativert.partitioner.base import TAG_KEY, DelegationSpec, PartitionResult
from nativert.passes import DEFAULT_PIPELINE, INFERENCE_PIPELINE
from tests.conftest import assert_close
from tests.models import make


class TagNodes:
    """A partitioner that tags whatever `choose(program)` returns."""

    def __init__(self, choose):
        self.choose = choose

    def partition(self, program):
        for node in self.choose(program):
            node.meta[TAG_KEY] = "t0"
        return PartitionResult(program, {"t0": DelegationSpec("eager")})

    def ops_to_preserve(self):
        return frozenset()


def test_unknown_backend_lists_known_ids():
    model, inputs = make("mlp")
    program = torch.export.export(model, inputs)
    with pytest.raises(
        nativert.UnknownDelegateError, match=r"'nope'.*registered delegates: .*eager"
    ):
        nativert.to_backend("nope", program)
    with pytest.raises(nativert.UnknownDelegateError, match=r"registered delegates: .*eager"):
        nativert.CapabilityPartitioner(["nope"])


def test_partitioner_tagging_output_node_is_rejected():
    model, inputs = make("mlp")
    program = torch.export.export(model, inputs)
    partitioner = TagNodes(lambda p: [p.graph.output_node()])
    with pytest.raises(nativert.PartitionError, match="tagged the output node"):
        nativert.to_backend(program, partitioner)


def test_partitioner_tagging_user_input_is_rejected():
    model, inputs = make("mlp")
    program = torch.export.export(model, inputs)
    partitioner = TagNodes(lambda p: [n for n in p.graph.nodes if n.name == "x"])
    with pytest.raises(nativert.PartitionError, match="tagged user input 'x'"):
        nativert.to_backend(program, partitioner)


def test_partitioner_changing_the_graph_is_rejected():
    class Renamer(TagNodes):
        def partition(self, program):
            node = next(n for n in program.graph.nodes if n.op == "call_function")
            node.name = "renamed"
            return PartitionResult(program, {})

    model, inputs = make("mlp")
    with pytest.raises(nativert.PartitionError, match="Renamer changed the program"):
        nativert.to_backend(torch.export.export(model, inputs), Renamer(None))


def test_region_that_would_create_a_cycle_is_rejected():
    model, inputs = make("split_by_sin")
    program = torch.export.export(model, inputs)

    def ends_around_sin(p):
        # relu -> sin -> addmm: tagging relu and addmm but not sin leaves a path that exits
        # the region and comes back.
        sin = next(n for n in p.graph.nodes if n.target is torch.ops.aten.sin.default)
        return [sin.args[0], next(iter(sin.users))]

    with pytest.raises(nativert.PartitionError, match="fusing would create a cycle"):
        nativert.to_backend(program, TagNodes(ends_around_sin))


def test_lowered_module_called_with_wrong_number_of_inputs():
    model, inputs = make("mlp")
    lowered = nativert.to_backend("eager", torch.export.export(model, inputs))
    with pytest.raises(nativert.DelegateCallError, match="expects inputs structured as"):
        lowered(*inputs, *inputs)
    view = lowered.graph_view()
    with pytest.raises(nativert.DelegateCallError, match=r"takes 7 arguments \(6 weights"):
        view(*inputs)


def test_call_delegate_rejects_non_lowered_module():
    with pytest.raises(nativert.DelegateCallError, match="must be a nativert LoweredBackendModule"):
        nativert.call_delegate(torch.nn.Linear(2, 2), torch.randn(2))


def test_whole_program_lowering_names_unsupported_nodes(registered):
    from tests.backend.test_to_backend import NoSinDelegate

    registered(NoSinDelegate())
    model, inputs = make("split_by_sin")
    with pytest.raises(nativert.LoweringError, match=r"sin.*not in this delegate's table"):
        nativert.to_backend("eager_no_sin", torch.export.export(model, inputs))


def test_partitioner_must_be_a_partitioner():
    model, inputs = make("mlp")
    program = torch.export.export(model, inputs)
    with pytest.raises(TypeError, match=r"write to_backend\('eager', program\)"):
        nativert.to_backend(program, "eager")
    with pytest.raises(
        TypeError,
        match=r"needs partition\(program\) and ops_to_preserve\(\) methods; int lacks "
        r"\['partition', 'ops_to_preserve'\]",
    ):
        nativert.to_backend(program, 3)


class Returns(TagNodes):
    """A partitioner that returns whatever it is told to (after tagging nothing)."""

    def __init__(self, result):
        self.result = result

    def partition(self, program):
        return self.result(program)


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (lambda p: None, r"Returns.partition\(\) returned NoneType; it must return nativert"),
        (lambda p: {"t0": "eager"}, r"returned dict; it must return nativert.PartitionResult"),
        (
            lambda p: PartitionResult(p, ["eager"]),
            r"tags of type list; PartitionResult.tags must map each tag to a DelegationSpec",
        ),
        (
            lambda p: PartitionResult(p, {"t0": "eager"}),
            r"gave tag 't0' the spec 'eager'; each tag needs a nativert.DelegationSpec",
        ),
    ],
    ids=["none", "dict", "list_of_tags", "string_spec"],
)
def test_partitioner_result_is_checked_and_the_error_says_what_it_must_be(result, message):
    model, inputs = make("mlp")
    with pytest.raises(nativert.PartitionError, match=message):
        nativert.to_backend(torch.export.export(model, inputs), Returns(result))


def _lowering(program):
    """What lowering made: the top-level code and, per segment, backend, code and specs."""
    return program.graph_module.code, [
        (m.backend_id, m.original_module.graph_module.code, m.compile_specs)
        for m in nativert.lowered_modules(program)
    ]


@pytest.mark.parametrize("name", ["convnet", "transformer", "split_by_sin"])
def test_default_pipeline_spelled_out_lowers_exactly_like_the_default(name):
    model, inputs = make(name)
    program = torch.export.export(model, inputs)
    default = nativert.to_backend(program)
    spelled = nativert.to_backend(program, passes=DEFAULT_PIPELINE)
    assert _lowering(spelled) == _lowering(default)
    assert nativert.delegate_nodes(default), "nothing was delegated"


def test_inference_pipeline_on_an_exported_program_folds_every_batch_norm():
    model, inputs = make("convnet")
    program = torch.export.export(model, inputs)
    batch_norms = [n for n in program.graph.nodes if "batch_norm" in str(n.target)]
    assert batch_norms, "the test model must have batch norms to fold"
    delegated = nativert.to_backend(program, passes=INFERENCE_PIPELINE)
    delegated.validate()
    everywhere = [n.target for n in delegated.graph.nodes] + [
        n.target for m in nativert.lowered_modules(delegated) for n in m.original_module.graph.nodes
    ]
    assert not [t for t in everywhere if "batch_norm" in str(t)]
    with torch.no_grad():
        assert_close(nativert.Executor(delegated)(*inputs), model(*inputs), atol=1e-5, rtol=1e-4)


def _specs(program):
    return [
        dict((s.key, s.value) for s in m.compile_specs) for m in nativert.lowered_modules(program)
    ]


def test_onnxruntime_threads_stop_spinning_only_when_other_code_runs_between_its_calls():
    hybrid, inputs = make("custom_op")  # ORT, a custom op in PyTorch, ORT
    whole, whole_inputs = make("mlp")
    lowered = nativert.to_backend(
        torch.export.export(hybrid, inputs), cache_dir=None, compare_with_pytorch=False
    )
    assert _specs(lowered) and all(s.get("intra_op_spinning") == "never" for s in _specs(lowered))
    with torch.no_grad():
        assert_close(nativert.Executor(lowered)(*inputs), hybrid(*inputs))
    alone = nativert.to_backend(torch.export.export(whole, whole_inputs), cache_dir=None)
    assert [s.get("intra_op_spinning") for s in _specs(alone)] == [None]
    chosen = nativert.to_backend(
        torch.export.export(hybrid, inputs),
        cache_dir=None,
        compile_specs={"onnxruntime": {"intra_op_spinning": "always"}},
        compare_with_pytorch=False,
    )
    assert all(s["intra_op_spinning"] == "always" for s in _specs(chosen))


_QUIET_SCRIPT = """
import logging, sys
import torch, nativert
assert "torchao" not in sys.modules, "import nativert must not import torchao"
# transformers imports torchao where it is installed (nativert[quant], dev), and torchao logs
# the CUDA kernels it cannot load: the user's import, not our call, so silenced here.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
import transformers
torch.manual_seed(0)
config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, vocab_size=100)
model = transformers.BertModel(config).eval()
ids = torch.randint(0, 100, (2, 8))
program = torch.export.export(model, (ids,))
lowered = nativert.to_backend(program, cache_dir=None)
nativert.Executor(lowered)(ids)
print("lowered", len(nativert.delegate_nodes(lowered)))
"""


def test_lowering_a_transformer_prints_nothing_but_ours():
    """torch's LeafSpec FutureWarnings, torch.onnx's 'torchvision is not installed' lines and
    ONNX Runtime's C++ warnings are silenced around nativert's calls."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _QUIET_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("lowered "), done.stdout
    assert done.stderr == ""


def test_onnxruntime_sessions_log_errors_only_unless_asked():
    model, inputs = make("mlp")
    program = torch.export.export(model, inputs)
    quiet = nativert.to_backend(program, cache_dir=None)
    verbose = nativert.to_backend(
        program, cache_dir=None, compile_specs={"onnxruntime": {"log_severity_level": 2}}
    )
    for lowered, level in ((quiet, 3), (verbose, 2)):
        (module,) = nativert.lowered_modules(lowered)
        session = module.executor.active_state().session
        assert session.get_session_options().log_severity_level == level
    with pytest.raises(nativert.SettingsError, match="'log_severity_level' must be 0"):
        nativert.to_backend(
            program, cache_dir=None, compile_specs={"onnxruntime": {"log_severity_level": 7}}
        )

"""PT2E-quantized programs: quantized units are never cut, each delegate runs them against
eager execution of the quantized program, packages keep them, nativert.quantize and
`nativert lower --int8` make them.

Tolerances: an int8 kernel requantizes where eager PyTorch computes in fp32 between Q and
DQ, so outputs may differ by a few quantization steps: within 2% of the largest |output|
(the accuracy guard's default budget is 1%, and each int8 region reports its error)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import nativert
from nativert._program.meta import TAG_KEY
from nativert._program.quant import (
    QDQ_OPS,
    QUANTIZE_OPS,
    cpu_has_int8_dot,
    quantized_units,
    split_units,
)
from nativert.backend.package.load import PackageError
from tests.backend.package.crafting import read_members, write_members

pytest.importorskip("torchao")

INT8_TOLERANCE = 2e-2


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU()).eval()


def conv():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


MODELS = {"mlp": (mlp, (8, 64)), "conv": (conv, (2, 3, 16, 16))}


def _quantized(name, scheme="x86"):
    make, shape = MODELS[name]
    torch.manual_seed(1)
    batches = [torch.randn(shape) for _ in range(4)]
    return nativert.quantize(make(), batches, scheme=scheme), torch.randn(shape)


@pytest.fixture(scope="module")
def quantized_mlp():
    return _quantized("mlp")


def rel_err(got, expected):
    return float((got - expected).detach().abs().max() / expected.detach().abs().max())


def _regions(program):
    report = nativert.delegation_report(program)
    return report, {r.name: r for r in report.regions}


def test_quantize_makes_a_pt2e_program_with_int8_weights(quantized_mlp):
    program, x = quantized_mlp
    targets = {n.target for n in program.graph.nodes}
    assert targets & QDQ_OPS
    int8 = [t for t in program.state_dict.values() if t.dtype == torch.int8]
    int8 += [t for t in program.constants.values() if t.dtype == torch.int8]
    assert len(int8) == 2  # one per linear
    # the fp32 originals of the int8 weights are gone (convert_pt2e leaves them unused)
    weights = [*program.state_dict.values(), *program.constants.values()]
    assert not [t for t in weights if t.dtype == torch.float32 and t.dim() == 2]
    with torch.no_grad():
        assert rel_err(program.module()(x), mlp()(x)) < 0.05  # quantization error, not a bug


def test_quantize_shares_no_tensor_with_the_model():
    model = mlp()
    program = nativert.quantize(model, torch.randn(8, 64))
    ours = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    theirs = [*program.state_dict.values(), *program.constants.values()]
    assert not [t for t in theirs if t.untyped_storage().data_ptr() in ours]


def test_quantize_refuses_bad_arguments():
    with pytest.raises(ValueError, match="scheme must be one of"):
        nativert.quantize(mlp(), torch.randn(8, 64), scheme="int4")
    with pytest.raises(TypeError, match="calibration batch 0 is a list"):
        nativert.quantize(mlp(), [[torch.randn(8, 64)]])


def test_reduce_range_scheme_quantizes_activations_to_7_bits():
    program, _ = _quantized("mlp", scheme="x86_reduce_range")
    quantize = [n for n in program.graph.nodes if n.target in QUANTIZE_OPS]
    assert quantize and all(n.args[3:5] == (0, 127) for n in quantize)


def test_units_keep_each_op_with_its_qdq(quantized_mlp):
    program, _ = quantized_mlp
    units = quantized_units(program.graph)
    linears = [n for n in program.graph.nodes if n.target is torch.ops.aten.linear.default]
    for linear in linears:  # each linear shares a unit with the dequantizes it reads
        (unit,) = [u for u in units if linear in u]
        assert all(a in unit for a in linear.all_input_nodes if a.target in QDQ_OPS)


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_quantized_program_lowers_whole_to_onnxruntime_int8(name):
    program, x = _quantized(name)
    delegated = nativert.to_backend(program)
    report, regions = _regions(delegated)
    assert report.delegated_nodes == report.total_nodes, report
    assert [r.precision for r in regions.values()] == ["int8"], report
    with torch.no_grad():
        expected = program.module()(x)
    assert rel_err(nativert.Executor(delegated)(x), expected) < INT8_TOLERANCE
    assert rel_err(delegated.module()(x), expected) < INT8_TOLERANCE


def test_a_region_boundary_never_cuts_a_unit(quantized_mlp):
    """The default partitioner's tags split no unit; a planted split is caught."""
    program, _ = quantized_mlp
    decomposed = program.run_decompositions()
    tagged = nativert.CapabilityPartitioner(["onnxruntime"]).partition(decomposed)
    tags = {n: n.meta.get(TAG_KEY) for n in tagged.tagged_program.graph.nodes}
    assert split_units(tagged.tagged_program.graph, tags) == []
    # Planted: one dequantize moved to another tag is a split the check names.
    dq = next(n for n in tags if n.target in QDQ_OPS and tags[n] is not None)
    planted = {**tags, dq: "elsewhere"}
    ((unit, spans),) = split_units(tagged.tagged_program.graph, planted)
    assert dq in unit and "elsewhere" in spans


def test_excluding_the_op_keeps_its_whole_unit_in_pytorch(quantized_mlp):
    program, x = quantized_mlp
    delegated = nativert.to_backend(program, exclude_ops=["aten::relu"], compare_with_pytorch=False)
    report = str(nativert.delegation_report(delegated))
    assert "its quantized unit" in report and "runs whole or not at all" in report
    graph = delegated.graph
    kept = {n for n in graph.nodes if n.op == "call_function" and n.target in QDQ_OPS}
    # each relu's unit (relu -> quantize) stays whole in PyTorch: no quantize of a relu
    # output was cut off into a delegate
    assert any(n.target in QUANTIZE_OPS for n in kept)
    with torch.no_grad():
        expected = program.module()(x)
    assert rel_err(nativert.Executor(delegated)(x), expected) < INT8_TOLERANCE


def test_narrow_ranges_are_exact_in_onnxruntime():
    """reduce_range clamps activations to 0..127, where ONNX's QuantizeLinear saturates at
    255: export.py clamps first, so ORT matches eager."""
    program, x = _quantized("mlp", scheme="x86_reduce_range")
    delegated = nativert.to_backend(program, delegates=["onnxruntime"])
    with torch.no_grad():
        expected = program.module()(x * 3)  # well past the calibrated range: clamps matter
    assert rel_err(nativert.Executor(delegated)(x * 3), expected) < INT8_TOLERANCE


@pytest.mark.skipif(not nativert.get_delegate("openvino").is_available(), reason="openvino missing")
@pytest.mark.parametrize("scheme", ["x86", "x86_reduce_range"])
def test_openvino_runs_quantized_programs_like_eager(scheme):
    """Whole on OpenVINO; where its int8 kernels are over the accuracy budget (u8 x s8
    saturation on CPUs without VNNI) the guard lowers the region in fp32, which computes
    the Q/DQ arithmetic as PyTorch does (up to summation order: a value on a rounding
    boundary may land one quantization step away)."""
    program, x = _quantized("conv", scheme=scheme)
    delegated = nativert.to_backend(program, delegates=["openvino"])
    report, regions = _regions(delegated)
    assert report.delegated_nodes == report.total_nodes, report
    (region,) = regions.values()
    with torch.no_grad():
        expected = program.module()(x)
    assert region.precision in ("int8", "fp32"), report
    assert rel_err(nativert.Executor(delegated)(x), expected) < INT8_TOLERANCE, report


def test_int8_package_loads_in_a_fresh_process(quantized_mlp, tmp_path):
    program, x = quantized_mlp
    delegated = nativert.to_backend(program)
    path = tmp_path / "int8.pt2"
    nativert.save(delegated, path)
    torch.save({"x": x, "expected": nativert.Executor(delegated)(x)}, tmp_path / "io.pt")
    script = (
        "import sys, torch, nativert\n"
        "p = nativert.load(sys.argv[1])\n"
        "io = torch.load(sys.argv[2])\n"
        "assert [m.precision for m in nativert.lowered_modules(p)] == ['int8']\n"
        "got = nativert.Executor(p)(io['x'])\n"
        "torch.testing.assert_close(got, io['expected'], atol=0, rtol=0)\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path), str(tmp_path / "io.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_scale_of_the_wrong_shape_is_refused_at_load(quantized_mlp, tmp_path):
    program, _ = quantized_mlp
    path, hostile = tmp_path / "int8.pt2", tmp_path / "hostile.pt2"
    nativert.save(nativert.to_backend(program), path)
    # Consistent, as an attacker would make it: 3 scales, their bytes, fresh digests.
    root, members = read_members(path)
    config = "data/weights/model_weights_config.json"
    data = json.loads(members[config])
    entry = next(v for k, v in data["config"].items() if "scale" in k)
    entry["tensor_meta"]["sizes"] = [{"as_int": 3}]
    weight = f"data/weights/{entry['path_name']}"
    members = {**members, config: json.dumps(data).encode(), weight: members[weight][:12]}
    write_members(hostile, root, members, refresh=True)
    with pytest.raises(PackageError, match=r"scale.*float32\[3\], but the program declares"):
        nativert.load(hostile)


def test_cli_lower_int8_with_a_calibration_file(tmp_path):
    factory = tmp_path / "factory.py"
    factory.write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),\n"
        "                            torch.nn.Linear(32, 8))\n"
        "    return m, (torch.randn(4, 16),)\n"
    )
    calibration = tmp_path / "calibration.pt"
    torch.save({"arg0": torch.randn(3, 4, 16)}, calibration)
    out = tmp_path / "int8.pt2"
    cli = [sys.executable, "-m", "nativert", "lower", f"{factory}:make", "-o", str(out)]
    done = subprocess.run(
        [*cli, "--int8", "--calibration", str(calibration)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "quantized to int8 (x86): rel err" in done.stdout
    assert "int8 (rel err" in done.stdout  # the region's precision and error
    assert [m.precision for m in nativert.lowered_modules(nativert.load(out))] == ["int8"]
    # a file whose tensors do not match the example inputs says what it wanted
    torch.save({"arg0": torch.randn(3, 5)}, calibration)
    done = subprocess.run(
        [*cli, "--int8", "--calibration", str(calibration)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and "expected [N, 4, 16]" in done.stderr


def test_quantize_prints_nothing():
    """torchao logs the CUDA kernels it cannot load on a CPU machine, and torch warns about
    its enums: nativert.quantize silences both around its own calls."""
    script = (
        "import torch, nativert\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()\n"
        "p = nativert.quantize(m, [torch.randn(2, 8)])\n"
        "nativert.Executor(nativert.to_backend(p, cache_dir=None))(torch.randn(2, 8))\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
    assert done.stderr == ""


@pytest.mark.slow
@pytest.mark.skipif(not nativert.get_delegate("aoti").is_available(), reason="no C++ compiler")
def test_aoti_int8_freezes_its_weights_and_refuses_other_ones(tmp_path):
    """Inductor's int8 kernels need freezing: the payload embeds the weights, is never
    cached, and its executor takes only those weights back."""
    program, x = _quantized("mlp", scheme="x86_reduce_range")
    cache = tmp_path / "cache"
    # accuracy: oneDNN requantizes between layers where eager stays fp32 (measured 1.6%
    # on an AVX2 CPU): over the default budget of 1%
    delegated = nativert.to_backend(program, delegates=["aoti"], accuracy=0.05, cache_dir=cache)
    report, regions = _regions(delegated)
    assert [r.precision for r in regions.values()] == ["int8"], report
    (lowered,) = nativert.lowered_modules(delegated)
    assert nativert.get_delegate("aoti").weights_in_payload({"precision": "int8"})
    assert not any(p.is_file() for p in cache.rglob("*"))  # nothing cached
    executor = nativert.Executor(delegated)
    with torch.no_grad():
        expected = program.module()(x)
    assert rel_err(executor(x), expected) < 0.05
    same = {k: v.clone() for k, v in delegated.state_dict.items()}
    executor.update_weights(same)  # the weights it froze in: accepted
    other = dict(same)
    name = next(k for k, v in same.items() if v.dtype == torch.int8)
    other[name] = same[name] // 2
    with pytest.raises(nativert.WeightsError, match="frozen into its compiled library"):
        executor.update_weights(other)
    assert rel_err(executor(x), expected) < 0.05  # nothing changed


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(32), nn.Linear(32, 32)

    def forward(self, x):
        return x + self.fc(self.norm(x))


@pytest.mark.slow
@pytest.mark.skipif(not nativert.get_delegate("aoti").is_available(), reason="no C++ compiler")
def test_aoti_int8_leaves_its_inputs_alone():
    """oneDNN's int8 lowering fuses `x + qlinear(x)` into a post-op that writes into x (torch
    2.13): the caller's input must come back unchanged."""
    torch.manual_seed(0)
    model, x = Residual().eval(), torch.randn(2, 16, 32)
    program = nativert.quantize(model, [torch.randn(2, 16, 32) for _ in range(4)])
    delegated = nativert.to_backend(
        program, delegates=["aoti"], accuracy=0.5, cache_dir=None, compare_with_pytorch=False
    )
    assert [m.precision for m in nativert.lowered_modules(delegated)] == ["int8"]
    before = x.clone()
    with torch.no_grad():
        expected = program.module()(x)
    executor = nativert.Executor(delegated)
    for _ in range(2):
        got = executor(x)
        assert torch.equal(x, before)
    # 8-bit activations: on CPUs without VNNI oneDNN's kernels saturate (15% measured here)
    assert rel_err(got, expected) < (0.05 if cpu_has_int8_dot() else 0.5)


def test_bert_returning_its_last_hidden_state_quantizes():
    """Its pooler (linear + tanh) is dead code there, on which X86InductorQuantizer's
    matcher fails (IndexError): nativert.quantize removes dead code first."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
    )

    class LastHidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = transformers.BertModel(config).eval()

        def forward(self, ids):
            return self.bert(ids).last_hidden_state

    torch.manual_seed(0)
    model, ids = LastHidden().eval(), torch.randint(0, 100, (2, 8))
    program = nativert.quantize(model, [(ids,)])
    delegated = nativert.to_backend(program)
    with torch.no_grad():
        expected = program.module()(ids)
    assert rel_err(nativert.Executor(delegated)(ids), expected) < INT8_TOLERANCE


def test_a_quantizer_failure_names_its_step(monkeypatch):
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    def fail(self, model):
        raise IndexError("list index out of range")

    monkeypatch.setattr(x86.X86InductorQuantizer, "annotate", fail)
    with pytest.raises(nativert.NativertError, match="X86InductorQuantizer could not annotate"):
        nativert.quantize(mlp(), torch.randn(8, 64))


def test_quantized_linears_reach_onnxruntime_in_forms_it_fuses():
    """A batched quantized linear (and one whose output stays fp32) is exported as a MatMul
    fed straight by DequantizeLinear, with the transpose on the int8 weight: what ONNX
    Runtime fuses into MatMulIntegerToFloat (torchlib's MatMul(x, Transpose(W)) it does not)."""
    import onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    calibration = [torch.randn(2, 8, 32) for _ in range(4)]
    program = nativert.quantize(model, calibration)
    delegated = nativert.to_backend(program, compare_with_pytorch=False)
    (segment,) = nativert.lowered_modules(delegated)
    graph = onnx.load_from_string(segment.processed_bytes).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 2
    assert all(producers.get(i) == "DequantizeLinear" for n in matmuls for i in n.input)
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        expected = program.module()(x)
    assert rel_err(nativert.Executor(delegated)(x), expected) < INT8_TOLERANCE


def test_autotune_measures_each_delegate_at_int8_and_fp32(quantized_mlp, tmp_path):
    """A quantized region's candidates are each delegate at int8 and in fp32 (its Q/DQ
    arithmetic), all held to the accuracy budget: fp32 Q/DQ may land a value one
    quantization step from PyTorch's, which is not a wrong result."""
    from nativert.backend.pipeline import lower_program

    program, x = quantized_mlp
    delegates = ["onnxruntime"]
    if nativert.get_delegate("openvino").is_available():
        delegates.append("openvino")
    settings = nativert.Settings(delegates=delegates, autotune=True, cache_dir=tmp_path)
    result = lower_program(program, settings)
    measured = {m.runner: m for d in result.tuning.decisions for m in d.measurements}
    assert "onnxruntime@int8" in measured and "onnxruntime" in measured, measured
    assert measured["onnxruntime@int8"].ms is not None, measured["onnxruntime@int8"]
    assert not [m for m in measured.values() if "wrong results" in (m.failure or "")]
    with torch.no_grad():
        expected = program.module()(x)
    assert rel_err(nativert.Executor(result.program)(x), expected) < INT8_TOLERANCE

"""nativert.Settings: one set of options, validated once, with the same names and meaning in
to_backend, torch.compile(options=) and `nativert lower`."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import nativert
from nativert import cli
from nativert.backend import pipeline
from nativert.backend import to_backend as to_backend_module
from nativert.settings import Settings

# -- validation ---------------------------------------------------------------------------


def test_defaults_live_in_one_place():
    settings = Settings()
    assert settings.delegates is None and settings.min_block_size == 1
    assert settings.cache_dir == "default" and not settings.strict and not settings.autotune
    assert dict(settings.compile_specs) == {}


def test_unknown_setting_lists_the_valid_ones():
    with pytest.raises(
        nativert.SettingsError, match=r"unknown nativert setting\(s\) \['delegate'\]"
    ):
        Settings.from_options({"delegate": ["onnxruntime"]})
    with pytest.raises(Exception, match=r"valid settings: \['delegates', 'min_block_size'"):
        torch.compile(torch.nn.Linear(2, 2), backend="nativert", options={"bogus": 1})(
            torch.randn(1, 2)
        )
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    with pytest.raises(nativert.SettingsError, match=r"\['bogus'\]; valid settings"):
        nativert.to_backend(program, bogus=1)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"min_block_size": 0}, r"setting min_block_size must be an int >= 1, got 0"),
        ({"num_threads": "2"}, r"setting num_threads must be an int >= 1, got '2'"),
        ({"strict": "yes"}, r"setting strict must be True or False"),
        ({"delegates": "onnxruntime"}, r"delegates must be a list of backend ids.*write \["),
        ({"delegates": ["nope"]}, r"setting delegates: unknown delegate backend_id 'nope'; reg"),
        ({"delegates": ["eager", "eager"]}, r"names a delegate twice"),
        ({"exclude_ops": "aten::relu"}, r"write \['aten::relu'\]"),
        ({"exclude_ops": ["relu"]}, r"exclude_ops: .*'namespace::name' strings, got 'relu'"),
        ({"cache_dir": 3}, r"setting cache_dir must be a path, 'default' or None"),
        ({"compile_specs": {"nope": {}}}, r"compile_specs\['nope'\]: unknown delegate"),
        ({"compile_specs": {"onnxruntime": 1}}, r"compile_specs\['onnxruntime'\] must be a dict"),
        (
            {"compile_specs": {"onnxruntime": {"threads": 1}}},
            r"compile_specs\['onnxruntime'\]: .*no compile specs \['threads'\]",
        ),
        (
            {"compile_specs": {"aoti": {"not_an_inductor_option": 1}}},
            r"compile_specs\['aoti'\]: \['not_an_inductor_option'\] are not Inductor config",
        ),
        (
            {"compile_specs": {"onnxruntime": {"intra_op_num_threads": 10**9}}},
            r"'intra_op_num_threads' must be an int from 0 .* to 1024, got 1000000000",
        ),
        (
            {"compile_specs": {"openvino": {"inference_num_threads": -1}}},
            r"'inference_num_threads' must be an int from 1 to 1024, got -1",
        ),
        (
            {"compile_specs": {"eager": {"x": object()}}},
            r"compile_specs\['eager'\]: values must be JSON data",
        ),
    ],
)
def test_bad_values_are_rejected_naming_the_setting(options, error):
    with pytest.raises(nativert.NativertError, match=error):
        Settings.from_options(options)


@pytest.mark.parametrize("budget", [0, -1.0, "10", True])
def test_autotune_budget_must_be_a_positive_number(budget):
    with pytest.raises(nativert.NativertError, match="autotune_budget_s must be a number > 0"):
        Settings(autotune_budget_s=budget)


# Values of the wrong type for every field (a test below checks that no field is missing).
_WRONG_TYPES = {
    "delegates": [5, "onnxruntime", [1], {"onnxruntime": 1}, {"onnxruntime"}],
    "min_block_size": ["2", 1.5, True, None],
    "exclude_ops": ["aten::relu", [3], 5],
    "allow_single_node_ops": ["aten::relu", [3], 5],
    "compile_specs": [[], "onnxruntime.x=1", {"onnxruntime": 3}, {"onnxruntime": {1: 2}}],
    "num_threads": ["2", 1.5, True],
    "strict": ["yes", 1, 0, None],
    "cache_dir": [3, 1.5, ["dir"]],
    "progress": ["yes", 1, 0],
    "autotune": ["yes", 1, 0, None],
    "compare_with_pytorch": ["yes", 1, 0, None],
    "autotune_budget_s": ["10", True, None, [1]],
    "precision": [16, None, ["bf16"], "int4", "BF16"],
    "accuracy": ["0.1", True, None, -1.0, float("nan"), float("inf")],
}


def test_every_setting_has_wrong_type_cases():
    assert sorted(_WRONG_TYPES) == sorted(Settings.names())


@pytest.mark.parametrize(
    ("name", "value"), [(name, v) for name, values in _WRONG_TYPES.items() for v in values]
)
def test_every_setting_rejects_a_value_of_the_wrong_type(name, value):
    with pytest.raises(nativert.NativertError, match=rf"setting {name}\b"):
        Settings(**{name: value})


def test_num_threads_reaches_every_delegate_that_takes_a_thread_count():
    settings = Settings(num_threads=3, compile_specs={"eager": {}})
    ort, eager = nativert.get_delegate("onnxruntime"), nativert.get_delegate("eager")
    assert settings.specs_for(ort) == (nativert.CompileSpec("intra_op_num_threads", 3),)
    assert settings.specs_for(eager) == ()  # takes no thread count
    explicit = Settings(num_threads=3, compile_specs={"onnxruntime": {"intra_op_num_threads": 1}})
    assert explicit.specs_for(ort) == (nativert.CompileSpec("intra_op_num_threads", 1),)


def test_a_precision_no_named_delegate_offers_is_refused_naming_what_each_offers():
    with pytest.raises(nativert.SettingsError) as caught:
        Settings(precision="bf16", delegates=["onnxruntime", "eager"])
    assert "precision='bf16' is not offered here" in str(caught.value)
    assert "onnxruntime: fp32; eager: fp32" in str(caught.value)
    with pytest.raises(nativert.SettingsError, match=r"'int4' is unknown: precisions are \['fp32'"):
        Settings(precision="int4")


def test_precision_reaches_exactly_the_delegates_that_offer_it():
    aoti, ort = nativert.get_delegate("aoti"), nativert.get_delegate("onnxruntime")
    if not aoti.is_available():
        pytest.skip(aoti.is_available().reason)
    settings = Settings(precision="bf16", delegates=["onnxruntime", "aoti"])
    assert settings.specs_for(aoti) == (nativert.CompileSpec("precision", "bf16"),)
    assert settings.specs_for(ort) == ()  # fp32 only: it computes as before
    assert Settings().specs_for(aoti) == ()  # fp32 is no compile spec: payloads as before
    # a compile spec set for the delegate wins over the setting
    explicit = Settings(precision="bf16", compile_specs={"aoti": {"precision": "fp32"}})
    assert explicit.specs_for(aoti) == (nativert.CompileSpec("precision", "fp32"),)
    # onnxruntime takes the spec only for quantized regions (int8, set by the partitioner)
    with pytest.raises(nativert.SettingsError, match=r"must be one of \['fp32', 'int8'\] for onnx"):
        Settings(compile_specs={"onnxruntime": {"precision": "bf16"}})


def test_a_partitioner_and_partitioning_settings_do_not_mix():
    model = torch.nn.Linear(2, 2)
    program = torch.export.export(model, (torch.randn(1, 2),))
    with pytest.raises(nativert.SettingsError, match=r"\['min_block_size'\] configure the"):
        nativert.to_backend(program, nativert.CapabilityPartitioner(), min_block_size=2)


# -- one option, three surfaces -----------------------------------------------------------
# Every field: a non-default value as Python passes it, the CLI arguments that say the same,
# and the value the pipeline must receive. A new field without a row fails the walk.
SAMPLES = {
    "delegates": (["eager"], ["--delegates", "eager"], ("eager",)),
    "min_block_size": (3, ["--min-block-size", "3"], 3),
    "exclude_ops": (["aten::relu"], ["--exclude-ops", "aten::relu"], ("aten::relu",)),
    "allow_single_node_ops": (
        [torch.ops.aten.addmm.default],
        ["--allow-single-node-ops", "aten::addmm"],
        ("aten::addmm",),
    ),
    "compile_specs": (
        {"onnxruntime": {"intra_op_num_threads": 1}},
        ["--compile-spec", "onnxruntime.intra_op_num_threads=1"],
        {"onnxruntime": {"intra_op_num_threads": 1}},
    ),
    "num_threads": (2, ["--num-threads", "2"], 2),
    "strict": (True, ["--strict"], True),
    "cache_dir": (None, ["--cache-dir", "none"], None),
    "progress": (True, ["--progress"], True),
    "autotune": (True, ["--autotune"], True),
    "compare_with_pytorch": (False, ["--no-compare-with-pytorch"], False),
    "autotune_budget_s": (12.5, ["--autotune-budget-s", "12.5"], 12.5),
    "precision": ("bf16", ["--precision", "bf16"], "bf16"),
    "accuracy": (0.05, ["--accuracy", "0.05"], 0.05),
}


class _Stop(Exception):
    """Raised by the spy once the pipeline has its settings: nothing needs to compile."""


@pytest.fixture
def pipeline_settings(monkeypatch):
    """The Settings each lower_program call received (a spy around the real pipeline)."""
    seen: list[Settings] = []

    def spy(program, settings, **kwargs):
        seen.append(settings)
        raise _Stop

    monkeypatch.setattr(pipeline, "lower_program", spy)
    monkeypatch.setattr(to_backend_module, "lower_program", spy)
    return seen


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x))


FACTORY = """
import torch

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x))

def make():
    return Tiny(), (torch.randn(2, 4),)
"""


def _through_to_backend(name, value):
    program = torch.export.export(Tiny(), (torch.randn(2, 4),))
    nativert.to_backend(program, **{name: value})


def _through_torch_compile(name, value):
    torch._dynamo.reset()
    compiled = torch.compile(Tiny(), backend="nativert", options={name: value})
    with torch.no_grad():
        compiled(torch.randn(2, 4))


def _through_cli(args, tmp_path):
    factory = tmp_path / "factory.py"
    factory.write_text(FACTORY)
    argv = ["--debug", "lower", f"{factory}:make", "-o", str(tmp_path / "out.pt2"), *args]
    cli.main(argv)


@pytest.mark.parametrize("name", Settings.names())
def test_every_setting_works_the_same_on_every_surface(name, pipeline_settings, tmp_path):
    assert set(SAMPLES) == set(Settings.names()), "add a row to SAMPLES for the new setting"
    value, cli_args, expected = SAMPLES[name]
    flags = {f.metadata["cli"].flag for f in dataclasses.fields(Settings)}
    assert cli_args[0].replace("--no-", "--") in flags
    surfaces = {
        "to_backend": lambda: _through_to_backend(name, value),
        "torch.compile": lambda: _through_torch_compile(name, value),
        "nativert lower": lambda: _through_cli(cli_args, tmp_path),
    }
    for surface, call in surfaces.items():
        pipeline_settings.clear()
        with pytest.raises(Exception) as caught:
            call()
        assert _Stop in _causes(caught.value), f"{surface}: {caught.value!r}"
        (settings,) = pipeline_settings
        got = getattr(settings, name)
        if name == "compile_specs":
            got = {k: dict(v) for k, v in got.items()}
        assert got == expected, f"{surface} gave {name}={got!r}, expected {expected!r}"


def test_progress_defaults_to_whether_stderr_is_a_terminal(pipeline_settings, tmp_path):
    for args, expected in (([], None), (["--no-progress"], False), (["--progress"], True)):
        pipeline_settings.clear()
        with pytest.raises(_Stop):
            _through_cli(args, tmp_path)
        assert pipeline_settings[0].progress is expected


@pytest.mark.parametrize("isatty", [True, False])
def test_show_progress_follows_the_terminal_unless_set(monkeypatch, isatty):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: isatty, raising=False)
    assert nativert.Settings().show_progress is isatty
    assert nativert.Settings(progress=False).show_progress is False
    assert nativert.Settings(progress=True).show_progress is True
    with pytest.raises(nativert.SettingsError, match="progress must be True or False"):
        nativert.Settings(progress="yes")


def _causes(exc: BaseException) -> list[type]:
    found = []
    while exc is not None:
        found.append(type(exc))
        exc = exc.__cause__ or exc.__context__
    return found


def test_int8_is_not_a_precision_setting_and_says_how_to_get_it():
    with pytest.raises(nativert.SettingsError, match=r"nativert.quantize\(model, calibration"):
        Settings(precision="int8")

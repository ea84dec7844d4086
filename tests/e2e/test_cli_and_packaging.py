"""The installed package: console script, `python -m nativert`, the Dynamo entry point, and
the CLI commands on a user's model factory."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest


def test_demo_runs_and_checks_numerics():
    result = subprocess.run(
        [sys.executable, "-m", "nativert", "demo"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    for name in ("[mlp]", "[convnet]", "[transformer]"):
        assert name in result.stdout
    assert result.stdout.count("numerics vs eager: OK") == 3
    assert result.stdout.count("Delegation report:") == 3
    assert "demo: all models match eager" in result.stdout


def test_unknown_command_fails_with_usage():
    result = subprocess.run(
        [sys.executable, "-m", "nativert", "nope"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "invalid choice: 'nope'" in result.stderr


def test_dynamo_backend_name_is_reserved_through_entry_point():
    (entry,) = [e for e in entry_points(group="torch_dynamo_backends") if e.name == "nativert"]
    assert entry.value == "nativert.backend.compile:nativert_backend"


def test_console_script_is_installed():
    path = Path(sys.executable).parent / "nativert"
    assert path.exists(), f"console script missing at {path}"
    result = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "demo" in result.stdout


FACTORIES = """
import torch


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    return model, (torch.randn(3, 8),)


def not_a_pair():
    return 3


def data_dependent():
    class Branch(torch.nn.Module):
        def forward(self, x):
            return x + 1 if x.sum() > 0 else x - 1

    return Branch(), (torch.randn(2),)
"""


def nativert_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nativert", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def test_lower_inspect_and_bench_a_user_factory(tmp_path):
    import json

    import torch

    import nativert

    (tmp_path / "factories.py").write_text(FACTORIES)
    lowered = nativert_cli(
        "lower",
        "factories.py:make",
        "-o",
        "m.pt2",
        "--dynamic-batch",
        "--progress",
        cwd=tmp_path,
    )
    assert lowered.returncode == 0, lowered.stderr
    assert "Delegation report: 3 of 3 nodes delegated" in lowered.stdout
    assert "compiling partitions" in lowered.stderr  # the progress bar, asked for (no tty)
    assert (tmp_path / "m.pt2").is_file()

    inspected = nativert_cli("inspect", "m.pt2", "--json", cwd=tmp_path)
    assert inspected.returncode == 0, inspected.stderr
    info = json.loads(inspected.stdout)
    (delegate,) = info["delegates"]
    assert delegate["backend_id"] == "onnxruntime" and delegate["payload_bytes"] > 0
    # Delegated whole: the segment's weights are all of the program's.
    assert delegate["weight_bytes"] == info["weight_bytes"] > 0
    assert "onnxruntime" in delegate["toolchain"]
    (x,) = info["inputs"]
    assert x["dtype"] == "float32" and x["shape"] == ["batch", 8]  # the user's Dim name
    assert info["dims"]["batch"]["max"] is None or info["dims"]["batch"]["max"] > 1
    (y,) = info["outputs"]
    assert y["name"] == "output" and y["shape"] == ["batch", 2]  # not the node's name
    assert info["report"]["delegated_nodes"] == 3

    text = nativert_cli("inspect", "m.pt2", cwd=tmp_path)
    assert "delegate onnxruntime_0: onnxruntime v1" in text.stdout
    assert re.search(r"input \w+: float32 \[batch, 8\]", text.stdout), text.stdout
    assert re.search(r"dims: batch\[\d+, (\d+|inf)\]", text.stdout), text.stdout

    benched = nativert_cli(
        "bench", "m.pt2", "--runs", "20", "--threads", "2", "--profile", cwd=tmp_path
    )
    assert benched.returncode == 0, benched.stderr
    assert re.search(r"latency (us|ms|s): p50 \d", benched.stdout), benched.stdout
    assert "calls/s" in benched.stdout
    assert re.search(r"memory: RSS \d+ MiB \([+-]\d+ MiB for the model\), peak", benched.stdout)
    assert "delegate 'onnxruntime'" in benched.stdout  # the profile

    # The saved program is the factory's model, at another batch size.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    x = torch.randn(6, 8)
    with torch.no_grad():
        got = nativert.Executor(nativert.load(tmp_path / "m.pt2"))(x)
        assert torch.allclose(got, model(x), atol=1e-5)


@pytest.mark.parametrize(
    ("seconds", "unit"), [(42e-6, "us"), (999e-6, "us"), (0.2558695, "ms"), (3.2, "s")]
)
def test_bench_picks_the_latency_unit(seconds, unit):
    from nativert.cli.package import latency_unit

    got, scale = latency_unit(seconds)
    assert got == unit and 0.1 <= seconds * scale < 1000


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "factories.py").write_text(FACTORIES)
    cases = {
        ("lower", "missing.py:make", "-o", "x.pt2"): "missing.py: no such file",
        ("lower", "factories.py:nope", "-o", "x.pt2"): "has no function 'nope'",
        ("lower", "factories.py:not_a_pair", "-o", "x.pt2"): "must return (model, example_args)",
        ("lower", "factories.py:data_dependent", "-o", "x.pt2"): "torch.export failed",
        ("lower", "factories.py", "-o", "x.pt2"): "expected FILE.py:FACTORY",
        ("inspect", "missing.pt2"): "missing.pt2: no such file",
        ("bench", "factories.py"): "not a readable .pt2 archive",
    }
    # One process runs every case (each in its own, they took 36 s of the suite): main()
    # with sys.stderr captured, which is where its error line and any warning go. The first
    # case and --debug also run as a user runs them, each in a process of its own.
    driver = (
        "import contextlib, io, json, sys\n"
        "from nativert import cli\n"
        "results = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        code = cli.main(args)\n"
        "    results.append([code, err.getvalue()])\n"
        "print(json.dumps(results))\n"
    )
    batch = subprocess.run(
        [sys.executable, "-c", driver, json.dumps([list(args) for args in cases])],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert batch.returncode == 0, batch.stderr[-2000:]
    first = nativert_cli(*next(iter(cases)), cwd=tmp_path)
    outcomes = [*json.loads(batch.stdout.splitlines()[-1]), [first.returncode, first.stderr]]
    for (args, message), (code, stderr) in zip(
        [*cases.items(), next(iter(cases.items()))], outcomes, strict=True
    ):
        assert code == 1, (args, stderr[-2000:])
        errors = [line for line in stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and message in errors[0], (args, stderr[-2000:])
        assert "Traceback" not in stderr, args
    debug = nativert_cli("--debug", "inspect", "missing.pt2", cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


BATCH_ONE_FACTORIES = """
import torch
import transformers


def linear():
    torch.manual_seed(0)
    return torch.nn.Linear(8, 2), (torch.randn(1, 8),)


class FixedBatch(torch.nn.Module):
    def forward(self, x):
        return x.reshape(4, -1)


def fixed_batch():
    return FixedBatch(), (torch.randn(4, 8),)


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
    )
    model = transformers.BertModel(config).eval()
    input_ids = torch.randint(0, 100, (1, 7))
    return model, (), {"input_ids": input_ids, "attention_mask": torch.ones(1, 7, dtype=torch.long)}


def kwargs_not_a_dict():
    return torch.nn.Linear(8, 2), (torch.randn(2, 8),), [1]


def kwargs_not_names():
    return torch.nn.Linear(8, 2), (), {0: torch.randn(2, 8)}


def kwargs_not_parameters():
    return torch.nn.Linear(8, 2), (), {"inputs": torch.randn(2, 8)}
"""


def test_lower_dynamic_batch_from_a_batch_one_example(tmp_path):
    import torch

    import nativert

    (tmp_path / "factories.py").write_text(BATCH_ONE_FACTORIES)
    lowered = nativert_cli(
        "lower", "factories.py:linear", "-o", "m.pt2", "--dynamic-batch", cwd=tmp_path
    )
    assert lowered.returncode == 0, lowered.stderr
    assert "example batch is 1; exporting with a batch-2 copy" in lowered.stdout
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    executor = nativert.Executor(nativert.load(tmp_path / "m.pt2"))
    for batch in (1, 5):
        x = torch.randn(batch, 8)
        with torch.no_grad():
            got, want = executor(x), model(x)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_lower_dynamic_batch_constraint_violation_says_why(tmp_path):
    (tmp_path / "factories.py").write_text(BATCH_ONE_FACTORIES)
    result = nativert_cli(
        "lower", "factories.py:fixed_batch", "-o", "m.pt2", "--dynamic-batch", cwd=tmp_path
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert "could not keep the batch dim" in error, result.stderr
    assert "specialized it to be a constant (4)" in error, error  # torch's reason
    assert "suggested fixes: batch = 4" in error, error
    assert "without --dynamic-batch" in error, error


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("kwargs_not_a_dict", "example_kwargs must be a dict, got list"),
        ("kwargs_not_names", "example_kwargs keys must be argument names, got 0"),
        ("kwargs_not_parameters", r"the example inputs do not fit Linear.forward"),
    ],
)
def test_lower_rejects_bad_example_kwargs(tmp_path, factory, message, capsys):
    """In process (the subprocess path is covered above): main() prints one error line."""
    from nativert.cli import main

    (tmp_path / "factories.py").write_text(BATCH_ONE_FACTORIES)
    factory_spec = f"{tmp_path / 'factories.py'}:{factory}"
    output = str(tmp_path / "m.pt2")
    assert main(["lower", factory_spec, "-o", output, "--dynamic-batch"]) == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    (error,) = [line for line in stderr.splitlines() if "error:" in line]
    assert message in error, error


def test_lower_a_transformers_model_from_example_kwargs(tmp_path):
    import runpy

    import torch

    import nativert

    pytest.importorskip("transformers")
    (tmp_path / "factories.py").write_text(BATCH_ONE_FACTORIES)
    lowered = nativert_cli(
        "lower", "factories.py:bert", "-o", "bert.pt2", "--dynamic-batch", cwd=tmp_path
    )
    assert lowered.returncode == 0, lowered.stderr
    assert "example batch is 1; exporting with a batch-2 copy" in lowered.stdout

    model, _, _ = runpy.run_path(str(tmp_path / "factories.py"))["bert"]()
    executor = nativert.Executor(nativert.load(tmp_path / "bert.pt2", plain_containers=True))
    for batch in (1, 3):
        input_ids = torch.randint(0, 100, (batch, 7))
        attention_mask = torch.ones(batch, 7, dtype=torch.long)
        attention_mask[-1, 5:] = 0  # padding in the last row
        with torch.no_grad():
            got = executor(input_ids=input_ids, attention_mask=attention_mask)
            want = model(input_ids=input_ids, attention_mask=attention_mask)
        for name in ("last_hidden_state", "pooler_output"):
            g, w = got[name], want[name]
            assert g.shape == w.shape and g.dtype == w.dtype, (name, batch)
            error = (g - w).abs().max().item()
            assert error <= 1e-4, (name, batch, error)

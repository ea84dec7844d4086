"""The installed package: console script, `python -m nativert`, the reserved Dynamo entry point."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path


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
    assert entry.value == "nativert.backend.dynamo:nativert_backend"


def test_console_script_is_installed():
    path = Path(sys.executable).parent / "nativert"
    assert path.exists(), f"console script missing at {path}"
    result = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "demo" in result.stdout

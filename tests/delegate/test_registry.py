"""The delegate registry: explicit priority order, duplicate checks, entry points, and errors
that list the known ids."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import nativert
from nativert.backend.delegates.eager import EagerDelegate
from tests.models import make

BUILTIN_ORDER = ["tensorrt", "onnxruntime", "openvino", "aoti", "eager"]


class Renamed(EagerDelegate):
    backend_id = "eager_copy"


class Unavailable(EagerDelegate):
    backend_id = "never_here"

    def is_available(self):
        return nativert.Availability(False, "its runtime library is not installed")


class Fast(EagerDelegate):
    """A non-reference delegate ranked between tensorrt (400) and onnxruntime (300)."""

    backend_id = "fast"
    priority = 350
    reference = False


def test_builtins_are_ordered_by_priority():
    assert nativert.list_delegates() == BUILTIN_ORDER
    assert [nativert.get_delegate(b).priority for b in BUILTIN_ORDER] == [400, 300, 250, 200, 0]
    assert nativert.get_delegate("eager").is_available()


def test_priority_not_registration_order_decides(registered):
    registered(Renamed())  # default priority of its base: 0, so by id after eager
    registered(Fast())  # registered last, ranked second
    assert nativert.list_delegates() == [
        "tensorrt",
        "fast",
        "onnxruntime",
        "openvino",
        "aoti",
        "eager",
        "eager_copy",
    ]
    model, inputs = make("mlp")
    delegated = nativert.to_backend(torch.export.export(model, inputs), compare_with_pytorch=False)
    assert [m.backend_id for m in nativert.lowered_modules(delegated)] == ["fast"]


def test_duplicate_registration_is_an_error(registered):
    registered(Renamed())
    with pytest.raises(nativert.NativertError, match="'eager_copy' is already registered"):
        nativert.register_delegate(Renamed())


@pytest.mark.parametrize("thing", [object(), Renamed], ids=["object", "class"])
def test_non_delegate_is_rejected_with_what_to_do(thing):
    with pytest.raises(nativert.NativertError, match="register an instance of a subclass"):
        nativert.register_delegate(thing)


def test_the_base_declares_every_member_it_reads():
    class Minimal(nativert.Delegate):
        backend_id = "minimal"

        def check_support(self, node):
            return None

        def preprocess(self, program, compile_specs):
            return b""

        def load(self, payload, compile_specs, *, reference):
            return nativert.delegate.ReferenceExecutor(reference)

    minimal = Minimal()
    assert minimal.version == "1" and minimal.priority == 100
    assert not minimal.reference and minimal.default_candidate and not minimal.cacheable
    assert minimal.is_available() and minimal.toolchain() == {}
    assert minimal.ops_to_preserve() == frozenset() and minimal.thread_spec is None
    with pytest.raises(ValueError, match=r"'minimal' has no compile specs \['x'\]"):
        minimal.check_compile_specs({"x": 1})

    class Incomplete(nativert.Delegate):
        backend_id = "incomplete"

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()


def test_unknown_id_lists_known_ones():
    with pytest.raises(
        nativert.UnknownDelegateError, match=r"'missing'.*registered delegates: .*eager"
    ):
        nativert.get_delegate("missing")


def test_unavailable_delegate_is_skipped_by_default_and_explained_when_asked(registered):
    registered(Unavailable())
    assert "never_here" not in nativert.list_delegates(available_only=True)
    model, inputs = make("mlp")
    program = torch.export.export(model, inputs)
    delegated = nativert.to_backend(program)  # default: available delegates only
    assert {m.backend_id for m in nativert.lowered_modules(delegated)} == {"onnxruntime"}
    with pytest.raises(nativert.DelegateUnavailableError, match="runtime library is not installed"):
        nativert.to_backend(program, nativert.CapabilityPartitioner(["never_here"]))


_PLUGIN = """
import torch
from nativert.backend.delegates.eager import EagerDelegate


class Tiny(EagerDelegate):
    \"\"\"Runs the reference graph, but only additions.\"\"\"

    backend_id = "tiny"
    priority = 350
    reference = False

    def check_support(self, node):
        return None if node.target is torch.ops.aten.add.Tensor else "tiny adds only"


def broken():
    raise RuntimeError("this plugin cannot start")
"""

_USE_PLUGIN = """
import logging, torch, nativert
logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

class AddMul(torch.nn.Module):
    def forward(self, x):
        return (x + 1) * (x + 2)

x = torch.randn(3)
delegated = nativert.to_backend(
    torch.export.export(AddMul(), (x,)), delegates=["tiny"], compare_with_pytorch=False
)
with torch.no_grad():
    assert torch.allclose(nativert.Executor(delegated)(x), AddMul()(x))
print(nativert.list_delegates())
print(sorted({m.backend_id for m in nativert.lowered_modules(delegated)}))
try:
    nativert.get_delegate("broken")
except nativert.UnknownDelegateError as exc:
    print(exc)
"""


def test_a_delegate_installed_through_the_entry_point_is_found_and_ordered(tmp_path):
    """A real distribution on sys.path (dist-info with entry_points.txt), in a fresh process:
    its delegate is registered by priority, used by name, and a broken one is reported."""
    (tmp_path / "tiny_delegate.py").write_text(_PLUGIN)
    info = tmp_path / "tiny_delegate-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-delegate\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[nativert_delegates]\ntiny = tiny_delegate:Tiny\nbroken = tiny_delegate:broken\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_USE_PLUGIN)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    order, used, error = result.stdout.strip().splitlines()[-3:]
    assert order == str(["tensorrt", "tiny", "onnxruntime", "openvino", "aoti", "eager"])
    assert used == str(["tiny"])
    assert "'broken' failed to load: RuntimeError: this plugin cannot start" in error
    assert "entry point 'broken' (tiny_delegate:broken) was not registered" in result.stderr

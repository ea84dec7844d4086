"""The Executor runs what `.module()` runs: programs without inputs, with weights alone, with
constant-only regions, and with effect tokens (linalg.inv's error check, effectful custom
ops, the print HOP), lowered, saved and loaded. Results are compared with eager."""

from __future__ import annotations

import pytest
import torch
from torch._library.effects import EffectType
from torch.export.graph_signature import InputKind, OutputKind

import nativert
from tests.conftest import assert_close

# Inverses amplify the float32 rounding of the delegated matmuls before them: the matrices
# here have condition numbers below ~10, so 1e-4 is ample and still catches a wrong result.
INVERSE = {"atol": 1e-4, "rtol": 1e-4}


def lowered(model: torch.nn.Module, args: tuple):
    program = nativert.to_backend(torch.export.export(model, args), compare_with_pytorch=False)
    return program, nativert.Executor(program)


def prepared_placeholders(executor) -> list[str]:
    return [n.name for n in executor._gm.graph.nodes if n.op == "placeholder"]


def with_effects_nodes(graph) -> list[str]:
    return [n.name for n in graph.nodes if "with_effects" in str(n.target)]


# -- no user inputs ---------------------------------------------------------------------------
class NoInputs(torch.nn.Module):
    def forward(self):
        return torch.arange(10.0).sin() * 2 + 1


class WeightsOnly(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(6, 6))
        self.register_buffer("b", torch.randn(6))

    def forward(self):
        return torch.tanh(self.w @ self.w.T) + self.b


class ConstantRegion(torch.nn.Module):
    """A constant computed from nothing, next to compute on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        c = torch.arange(8.0).reshape(2, 4).sin() * 3
        return self.fc(x).relu() + c


@pytest.mark.parametrize(
    "model, args",
    [(NoInputs(), ()), (WeightsOnly(), ()), (ConstantRegion(), (torch.randn(2, 4),))],
    ids=["no_inputs", "weights_only", "constant_region"],
)
def test_programs_without_user_inputs_run(model, args):
    torch.manual_seed(0)
    program, executor = lowered(model, args)
    assert nativert.delegate_nodes(program), "nothing was delegated: the test tests nothing"
    with torch.no_grad():
        expected = model(*args)
        assert_close(executor(*args), expected, what="executor")
        assert_close(program.module()(*args), expected, what="module")
        assert_close(executor(*args), expected, what="executor, second call")


def test_program_without_inputs_takes_only_the_delegate_states():
    """The states placeholder goes first when there is no placeholder to follow (it used to
    be appended after the output, and FX refused the graph)."""
    _, executor = lowered(NoInputs(), ())
    assert prepared_placeholders(executor) == ["nativert_delegate_states"]
    with pytest.raises(nativert.DelegateCallError, match=r"expected 0 inputs \(\), got 1"):
        executor(torch.ones(1))


# -- effect tokens: linalg.inv ----------------------------------------------------------------
class InverseBetween(torch.nn.Module):
    """Delegated linear layers before and after linalg.inv, whose error check
    (aten._linalg_check_errors) export threads an effect token through."""

    def __init__(self) -> None:
        super().__init__()
        self.before = torch.nn.Linear(8, 8)
        self.after = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.before(x))
        a = h @ h.T + torch.eye(h.shape[0]) * 4
        return torch.sigmoid(self.after(torch.linalg.inv(a)))


class InverseOnly(torch.nn.Module):
    def forward(self, a):
        return torch.linalg.inv(a)


@pytest.fixture(scope="module")
def inverse_between():
    torch.manual_seed(0)
    model, x = InverseBetween().eval(), torch.randn(8, 8)
    program, executor = lowered(model, (x,))
    return model, x, program, executor


def test_linalg_inv_between_delegates_matches_eager_and_module(inverse_between):
    model, x, program, executor = inverse_between
    kinds = [s.kind for s in program.graph_signature.input_specs]
    assert InputKind.TOKEN in kinds, "export threads no token here: the test tests nothing"
    assert len(nativert.delegate_nodes(program)) == 2
    with torch.no_grad():
        expected = model(x)
        for i in range(2):
            assert_close(executor(x), expected, **INVERSE, what=f"executor call {i}")
        assert_close(program.module()(x), expected, **INVERSE, what="module")


def test_tokens_cost_nothing_per_call(inverse_between):
    """The token input is gone from the generated code and the checks are direct calls."""
    _, _, program, executor = inverse_between
    assert with_effects_nodes(program.graph)
    assert "token" not in prepared_placeholders(executor)
    assert not with_effects_nodes(executor._gm.graph)
    checks = [
        n
        for n in executor._gm.graph.nodes
        if n.target is torch.ops.aten._linalg_check_errors.default
    ]
    assert len(checks) == 1


def test_linalg_inv_of_a_singular_matrix_raises_like_eager():
    """The error check is kept: a singular matrix raises, as in eager and `.module()`."""
    program, executor = lowered(InverseOnly(), (torch.randn(4, 4) + torch.eye(4) * 4,))
    a = torch.randn(4, 4) + torch.eye(4) * 4
    assert_close(executor(a), torch.linalg.inv(a), **INVERSE)
    singular = torch.ones(4, 4)
    for run in (torch.linalg.inv, program.module(), executor):
        with pytest.raises(torch.linalg.LinAlgError, match="singular"):
            run(singular)


def test_linalg_lu_factor_runs():
    class LuSolve(torch.nn.Module):
        def forward(self, a, b):
            lu, pivots = torch.linalg.lu_factor(a)
            return torch.linalg.lu_solve(lu, pivots, b * 2)

    a, b = torch.randn(5, 5) + torch.eye(5) * 5, torch.randn(5, 2)
    program, executor = lowered(LuSolve(), (a, b))
    expected = LuSolve()(a, b)
    assert_close(executor(a, b), expected, **INVERSE, what="executor")
    assert_close(program.module()(a, b), expected, **INVERSE, what="module")


def test_saved_and_loaded_program_with_tokens_runs(inverse_between, tmp_path):
    model, x, program, _ = inverse_between
    path = tmp_path / "inverse.pt2"
    nativert.save(program, path)
    loaded = nativert.load(path)
    assert OutputKind.TOKEN in [s.kind for s in loaded.graph_signature.output_specs]
    with torch.no_grad():
        assert_close(nativert.Executor(loaded)(x), model(x), **INVERSE)


# -- effect tokens: effectful custom ops ------------------------------------------------------
_NAMESPACE = "nativert_test_effects"


@pytest.fixture(scope="module")
def effectful_ops():
    """Three custom ops registered as ORDERED-effectful, returning one tensor, two, and
    nothing; each appends (its name, its tag) to the log. The library, its ops and their
    effects are removed when the module's tests are done."""
    log: list[tuple[str, int]] = []
    lib = torch.library.Library(_NAMESPACE, "FRAGMENT")
    lib.define("record(Tensor x, int tag) -> Tensor")
    lib.define("split(Tensor x, int tag) -> (Tensor, Tensor)")
    lib.define("note(Tensor x, int tag) -> ()")

    def record(x, tag):
        log.append(("record", tag))
        return x * 2

    def split(x, tag):
        log.append(("split", tag))
        return x + 1, x - 1

    def note(x, tag):
        log.append(("note", tag))

    for name, fn in (("record", record), ("split", split), ("note", note)):
        lib.impl(name, fn, "CompositeExplicitAutograd")
    lib.impl("record", lambda x, tag: torch.empty_like(x), "Meta")
    lib.impl("split", lambda x, tag: (torch.empty_like(x), torch.empty_like(x)), "Meta")
    lib.impl("note", lambda x, tag: None, "Meta")
    for name in ("record", "split", "note"):
        lib._register_effectful_op(f"{_NAMESPACE}::{name}", EffectType.ORDERED)
    yield getattr(torch.ops, _NAMESPACE), log
    lib._destroy()


class Effectful(torch.nn.Module):
    def __init__(self, ops) -> None:
        super().__init__()
        self.ops = ops
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.a(x))
        self.ops.note(h, 0)
        r = self.ops.record(h, 1)
        lo, hi = self.ops.split(self.b(r), 2)
        self.ops.note(lo, 3)
        return self.b(torch.tanh(lo)) * hi


def test_effectful_custom_ops_run_once_in_order(effectful_ops, tmp_path):
    ops, log = effectful_ops
    torch.manual_seed(0)
    model, x = Effectful(ops).eval(), torch.randn(4, 8)
    program, executor = lowered(model, (x,))
    assert len(with_effects_nodes(program.graph)) == 4
    assert nativert.delegate_nodes(program)
    path = tmp_path / "effectful.pt2"
    nativert.save(program, path)
    loaded = nativert.Executor(nativert.load(path))
    order = [("note", 0), ("record", 1), ("split", 2), ("note", 3)]
    with torch.no_grad():
        log.clear()
        expected = model(x)
        assert log == order
        for what, run in (("executor", executor), ("module", program.module()), ("loaded", loaded)):
            log.clear()
            assert_close(run(x), expected, what=what)
            assert log == order, f"{what}: effects ran as {log}"


# -- effect tokens: a higher-order operator under with_effects -------------------------------
class HopPrint(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        from torch._higher_order_ops.print import print as hop_print

        h = self.fc(x).relu()
        hop_print("nativert-hop-print {}", h.shape[0])
        return self.fc(h) * 2


def test_with_effects_of_a_higher_order_op_gets_a_token_the_graph_creates(capsys):
    """It stays a with_effects call (no schema to call it by), fed the graph's own token.
    (`.module()` cannot run this program in torch 2.13: its token removal fails on it.)"""
    torch.manual_seed(0)
    model, x = HopPrint().eval(), torch.randn(2, 4)
    program, executor = lowered(model, (x,))
    assert InputKind.TOKEN in [s.kind for s in program.graph_signature.input_specs]
    assert prepared_placeholders(executor) == ["x", "nativert_delegate_states"]
    with torch.no_grad():
        expected = model(x)
        assert capsys.readouterr().out == "nativert-hop-print 2\n"
        assert_close(executor(x), expected)
    assert capsys.readouterr().out == "nativert-hop-print 2\n"

"""Executor: same results as program.module() and eager, input checks, atomic weight swaps
under concurrent traffic, frames, profile."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch.export import Dim

import nativert
from tests.conftest import assert_close, run_in_threads
from tests.models import make


class DictInOut(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, inputs: dict, pair: tuple):
        h = self.fc(inputs["a"]) + pair[0]
        return {"h": h, "both": (h * pair[1], inputs["b"].sum())}


def executor_for(name, **export_kwargs):
    model, inputs = make(name)
    # These tests are about running delegates: the plan is kept as partitioned.
    program = nativert.to_backend(
        torch.export.export(model, inputs, **export_kwargs), compare_with_pytorch=False
    )
    return model, inputs, program, nativert.Executor(program)


@pytest.mark.parametrize("name", ["mlp", "convnet", "transformer", "custom_op", "multi_output"])
def test_executor_matches_module_and_eager(name):
    model, inputs, program, executor = executor_for(name)
    with torch.no_grad():
        expected = model(*inputs)
        assert_close(executor(*inputs), expected, what="executor")
        assert_close(program.module()(*inputs), expected, what="module")


def test_two_delegates_with_pytorch_between_are_called_directly():
    _, _, program, executor = executor_for("custom_op")
    assert len(nativert.delegate_nodes(program)) == 2
    targets = [n.target for n in executor._gm.graph.nodes if n.op == "call_function"]
    assert nativert.call_delegate not in targets
    runners = [t for t in targets if type(t).__name__ == "_DelegateRunner"]
    assert [r.lowered.backend_id for r in runners] == ["onnxruntime", "onnxruntime"]


def test_weights_only_delegates_read_are_not_passed_per_call():
    """They live in the delegate executors: the generated code passes the user inputs alone
    (one argument per weight per call was measurable on a conv net with 28 weights)."""
    _, inputs, _, executor = executor_for("convnet")
    placeholders = [n.name for n in executor._gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["x", "nativert_delegate_states"]


def test_dict_and_tuple_inputs_and_outputs():
    model = DictInOut()
    inputs = ({"a": torch.randn(2, 4), "b": torch.randn(3)}, (torch.randn(2, 4), torch.randn(2, 4)))
    executor = nativert.Executor(nativert.to_backend(torch.export.export(model, inputs)))
    with torch.no_grad():
        assert_close(executor(*inputs), model(*inputs))
        assert_close(executor(inputs[0], pair=inputs[1]), model(*inputs), what="kwargs")


def test_buffer_state_advances():
    model, inputs, _, executor = executor_for("counter")
    reference, _ = make("counter")
    with torch.no_grad():
        for step in range(1, 4):
            assert_close(executor(*inputs), reference(*inputs), what=f"call {step}")
    assert executor.weights()["steps"].tolist() == [3.0] * 4


def test_dynamic_batch_and_its_range():
    model, _, _, executor = executor_for("mlp", dynamic_shapes=({0: Dim("batch", min=1, max=64)},))
    with torch.no_grad():
        for batch in (1, 9, 64):
            x = torch.randn(batch, 32)
            assert_close(executor(x), model(x), what=f"batch {batch}")
    with pytest.raises(
        nativert.DelegateCallError,
        match=r"input 'x' has size 65 in dimension 0, outside the exported "
        r"range \[1, 64\]",
    ):
        executor(torch.randn(65, 32))


@pytest.fixture(scope="module")
def mlp_executor():
    model, inputs = make("mlp")
    program = nativert.to_backend(torch.export.export(model, inputs))
    return model, inputs, nativert.Executor(program)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            (torch.randn(4, 32, dtype=torch.float64),),
            r"input 'x' has dtype torch.float64, expected torch.float32",
        ),
        ((torch.randn(4, 32, 1),), r"input 'x' has rank 3 \(shape \(4, 32, 1\)\), expected rank 2"),
        ((torch.randn(4, 31),), r"input 'x' has size 31 in dimension 1, expected 32"),
        ((), r"expected 1 inputs \(x\), got 0"),
        (([1.0],), r"input 'x' must be a Tensor, got list"),
        # Any other device gets the same check; meta shows it on machines without CUDA.
        ((torch.randn(4, 32, device="meta"),), r"input 'x' is on meta, expected cpu"),
    ],
    ids=["dtype", "rank", "static_dim", "too_few", "not_tensor", "device"],
)
def test_bad_inputs_get_clear_errors(mlp_executor, args, message):
    _, _, executor = mlp_executor
    with pytest.raises(nativert.DelegateCallError, match=message):
        executor(*args)


def two_weight_sets(model):
    first = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    second = {k: torch.randn_like(v) for k, v in first.items()}
    return first, second


def test_update_weights_matches_eager_with_new_weights():
    model, inputs, _, executor = executor_for("mlp")
    _, second = two_weight_sets(model)
    executor.update_weights(second)
    model.load_state_dict(second)
    with torch.no_grad():
        assert_close(executor(*inputs), model(*inputs))
    assert executor.weights()["fc1.weight"] is second["fc1.weight"]  # shared, not copied


def test_staged_weights_switch_only_on_commit_and_carry_a_version():
    model, inputs, _, executor = executor_for("mlp")
    first, second = two_weight_sets(model)
    with torch.no_grad():
        before, version = executor.call_versioned(*inputs)
        assert version == executor.weights_version == 0
        executor.stage_weights(second, version=7)
        with pytest.raises(nativert.WeightsError, match="version 7 are staged already"):
            executor.stage_weights(second)
        staged_out, version = executor.call_versioned(*inputs)  # staged: not yet in use
        assert version == 0 and torch.equal(staged_out, before)
        assert executor.commit_weights() == 7
        model.load_state_dict(second)
        after, version = executor.call_versioned(*inputs)
        assert version == 7
        assert_close(after, model(*inputs))
        executor.stage_weights(first)
        executor.discard_weights()
        assert executor.weights_version == 7 and torch.equal(executor(*inputs), after)
        with pytest.raises(nativert.WeightsError, match="nothing is staged"):
            executor.commit_weights()
        executor.update_weights(first)
        assert executor.weights_version == 8


def test_bad_update_raises_and_changes_nothing():
    model, inputs, _, executor = executor_for("custom_op")  # two delegates
    with torch.no_grad():
        before = executor(*inputs)
    bad = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    bad["b.weight"] = torch.randn(2, 2)
    with pytest.raises(
        nativert.WeightsError, match=r"'b.weight' has shape \(2, 2\), expected \(8, 8\)"
    ):
        executor.update_weights(bad)
    del bad["b.weight"]
    with pytest.raises(nativert.WeightsError, match=r"missing \['b.weight'\]"):
        executor.update_weights(bad)
    with torch.no_grad():
        assert torch.equal(executor(*inputs), before)
    missing, unexpected = executor.update_weights(bad, strict=False)
    assert missing == ["b.weight"] and unexpected == []


def test_concurrent_calls_during_weight_swaps_never_tear():
    model, (x,), _, executor = executor_for("custom_op")  # two ORT delegates + PyTorch op
    first, second = two_weight_sets(model)
    with torch.no_grad():
        executor.update_weights(second)
        out_second = executor(x)
        executor.update_weights(first)
        out_first = executor(x)
    assert not torch.allclose(out_first, out_second)
    counts = {"first": 0, "second": 0}
    lock = threading.Lock()

    def caller():
        with torch.no_grad():
            for _ in range(500):
                out = executor(x)
                if torch.equal(out, out_first):
                    which = "first"
                elif torch.equal(out, out_second):
                    which = "second"
                else:
                    raise AssertionError("a result matched neither weight set (torn)")
                with lock:
                    counts[which] += 1

    def updater():
        for i in range(20):
            executor.update_weights(second if i % 2 == 0 else first)

    run_in_threads(caller, caller, caller, caller, updater)
    assert counts["first"] + counts["second"] == 2000
    assert 1 <= executor.peak_concurrency <= executor.num_frames


@torch.library.custom_op("nativert_test::slow_copy", mutates_args=())
def slow_copy(x: torch.Tensor) -> torch.Tensor:
    """Holds its call for 50 ms (releasing the GIL), so concurrent calls overlap."""
    time.sleep(0.05)
    return x.clone()


@slow_copy.register_fake
def _(x):
    return torch.empty_like(x)


class Slow(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.ops.nativert_test.slow_copy(self.fc(x)))


def test_num_frames_bounds_concurrent_calls():
    x = torch.randn(2, 4)
    program = nativert.to_backend(torch.export.export(Slow(), (x,)))
    bounded = nativert.Executor(program, num_frames=2)
    assert bounded.num_frames == 2
    run_in_threads(*[lambda: bounded(x)] * 4)
    assert bounded.peak_concurrency == 2  # four callers, two at a time
    free = nativert.Executor(program, num_frames=8)
    run_in_threads(*[lambda: free(x)] * 4)
    assert free.peak_concurrency > 2, "without the bound, the slow calls overlap"
    with pytest.raises(nativert.NativertError, match="num_frames must be >= 1"):
        nativert.Executor(program, num_frames=-1)


def test_profile_times_every_node_and_names_delegates(mlp_executor):
    _, inputs, executor = mlp_executor
    table = executor.profile(*inputs, warmup=1, runs=5)
    delegates = [row for row in table if row.delegate]
    assert [row.delegate for row in delegates] == ["onnxruntime"]
    assert all(row.median_us > 0 for row in table)
    assert "delegate 'onnxruntime'" in str(table)


def test_executor_update_does_not_leak_into_module_or_other_executors():
    model, inputs = make("mlp")
    program = nativert.to_backend(torch.export.export(model, inputs))
    module = program.module()
    first = nativert.Executor(program)
    with torch.no_grad():
        expected = model(*inputs)
        first.update_weights({k: torch.randn_like(v) for k, v in model.state_dict().items()})
        assert_close(module(*inputs), expected, what="program.module() after the update")
        assert_close(nativert.Executor(program)(*inputs), expected, what="a new Executor")
        assert not torch.allclose(first(*inputs), expected)


def test_constant_int_input_is_checked():
    class Scale(torch.nn.Module):
        def forward(self, x, n: int):
            return x * n

    program = nativert.to_backend(torch.export.export(Scale(), (torch.randn(3), 2)))
    executor = nativert.Executor(program)
    assert_close(executor(torch.ones(3), 2), torch.full((3,), 2.0))
    with pytest.raises(
        nativert.DelegateCallError, match=r"input 'n' was exported as the constant 2 .* got 3"
    ):
        executor(torch.ones(3), 3)


def test_keyword_arguments_in_any_order():
    class KW(torch.nn.Module):
        def forward(self, x, *, a, b):
            return x + a * 2 - b

    x, a, b = torch.randn(3), torch.randn(3), torch.randn(3)
    program = nativert.to_backend(torch.export.export(KW(), (x,), {"a": a, "b": b}))
    executor = nativert.Executor(program)
    expected = KW()(x, a=a, b=b)
    assert_close(executor(x, b=b, a=a), expected)
    assert_close(executor(x, a=a, b=b), expected)


def test_zero_frames_is_an_error():
    model, inputs = make("mlp")
    program = nativert.to_backend(torch.export.export(model, inputs))
    with pytest.raises(nativert.NativertError, match="num_frames must be >= 1, got 0"):
        nativert.Executor(program, num_frames=0)


def test_executor_state_is_its_own():
    model, inputs = make("counter")
    program = nativert.to_backend(torch.export.export(model, inputs))
    first = nativert.Executor(program)
    with torch.no_grad():
        first(*inputs)
        first(*inputs)
    assert first.weights()["steps"].tolist() == [2.0] * 4
    assert program.state_dict["steps"].tolist() == [0.0] * 4
    assert nativert.Executor(program).weights()["steps"].tolist() == [0.0] * 4


def test_strict_update_with_state_dict_of_model_with_non_persistent_buffer():
    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)
            self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)

        def forward(self, x):
            return self.fc(x) * self.scale

    model, x = Scaled(), torch.randn(2, 4)
    executor = nativert.Executor(nativert.to_backend(torch.export.export(model, (x,))))
    new = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    assert "scale" not in new
    executor.update_weights(new)  # strict: only parameters and persistent buffers required
    model.load_state_dict(new)
    with torch.no_grad():
        assert_close(executor(x), model(x))


def test_derived_dynamic_dim_is_validated():
    from torch.export import Dim

    class Shifted(torch.nn.Module):
        def forward(self, x, y):
            return x + y[1:]

    b = Dim("b", min=2, max=16)
    x, y = torch.randn(4, 3), torch.randn(5, 3)
    program = nativert.to_backend(
        torch.export.export(Shifted(), (x, y), dynamic_shapes=({0: b}, {0: b + 1}))
    )
    executor = nativert.Executor(program)
    assert_close(executor(torch.ones(6, 3), torch.ones(7, 3)), torch.full((6, 3), 2.0))
    with pytest.raises(
        nativert.DelegateCallError, match=r"input 'y' has size 5 in dimension 0, expected .*= 7"
    ):
        executor(torch.ones(6, 3), torch.ones(5, 3))


def test_weight_update_on_wrong_device_is_refused():
    model, inputs = make("mlp")
    executor = nativert.Executor(nativert.to_backend(torch.export.export(model, inputs)))
    new = {k: torch.randn_like(v, device="meta") for k, v in model.state_dict().items()}
    with pytest.raises(nativert.WeightsError, match=r"is on meta, expected cpu"):
        executor.update_weights(new)


def test_an_executor_takes_over_the_sessions_lowering_built(monkeypatch):
    """to_backend builds each segment's session once (to check that ONNX Runtime accepts
    the payload); the first Executor takes those over instead of building a second session
    over the same weights. `.module()` calls after that, and other Executors, build their
    own: no session is ever shared by two owners."""
    import onnxruntime

    built = []

    class Counted(onnxruntime.InferenceSession):
        def __init__(self, *args, **kwargs):
            built.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", Counted)
    model, inputs = make("split_by_sin")
    program = nativert.to_backend(
        torch.export.export(model, inputs),
        exclude_ops=["aten::sin"],
        cache_dir=None,
        compare_with_pytorch=False,  # its Executor would build sessions too
    )
    segments = len(nativert.delegate_nodes(program))
    assert segments == 2 and len(built) == segments
    executor = nativert.Executor(program)
    assert len(built) == segments  # taken over, not built again
    with torch.no_grad():
        for _ in range(3):
            assert_close(executor(*inputs), model(*inputs))
        assert len(built) == segments  # calls build nothing
        module = program.module()
        module(*inputs)
        module(*inputs)
        assert len(built) == 2 * segments  # .module() builds its own once, then reuses them
        assert_close(executor(*inputs), model(*inputs))
        nativert.Executor(program)
    assert len(built) == 2 * segments  # bound to the same weights: it takes .module()'s
    # ...and the next .module() call builds again, while the Executors keep theirs.
    assert_close(program.module()(*inputs), model(*inputs))
    assert len(built) == 3 * segments


def test_a_sparse_weight_in_an_update_is_named():
    model, inputs = make("mlp")
    executor = nativert.Executor(nativert.to_backend(torch.export.export(model, inputs)))
    new = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    new["fc2.weight"] = new["fc2.weight"].to_sparse()
    with pytest.raises(
        nativert.WeightsError,
        match=r"weight 'fc2.weight' is a torch.sparse_coo tensor; .*"
        r"pass 'fc2.weight'.to_dense\(\)",
    ):
        executor.update_weights(new)


# -- commits publish one generation, whoever reads the weights ------------------------------
class ReadByDelegate(torch.nn.Module):
    """fc's weights are read by the delegate only."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 6)

    def forward(self, x):
        return torch.relu(self.fc(x)) + 1


class ReadByPyTorch(ReadByDelegate):
    """Excluding linear keeps fc (and so its weights) in PyTorch; relu and add are
    delegated."""


class ReadByBoth(ReadByDelegate):
    """fc.weight feeds the delegated linear and a sin kept in PyTorch."""

    def forward(self, x):
        return torch.relu(self.fc(x)) + torch.sin(self.fc.weight).sum()


_READERS = {
    "delegate": (ReadByDelegate, []),
    "pytorch": (ReadByPyTorch, ["aten::linear", "aten::addmm", "aten::mm", "aten::t"]),
    "both": (ReadByBoth, ["aten::sin"]),
}


class _Watched(nativert.Executor):
    """Records each delegate commit and each publish of a generation, in order."""

    def __init__(self, program, events):
        self._events = events
        super().__init__(program)
        for runner in self._runners:
            commit = runner.executor.commit_weights

            def recorded(commit=commit, name=runner.lowered.module_name):
                events.append(("commit", name))
                commit()

            runner.executor.commit_weights = recorded

    def __setattr__(self, name, value):
        if name == "_gen" and "_gen" in self.__dict__:
            self._events.append(("publish", value.version))
        super().__setattr__(name, value)


@pytest.mark.parametrize("reader", list(_READERS))
def test_a_commit_publishes_one_generation_after_every_delegate_switched(reader):
    cls, excluded = _READERS[reader]
    torch.manual_seed(0)
    model, x = cls().eval(), torch.randn(3, 6)
    program = nativert.to_backend(
        torch.export.export(model, (x,)), exclude_ops=excluded, compare_with_pytorch=False
    )
    weights_in_delegates = sum(m.num_weights for m in nativert.lowered_modules(program))
    # The structure each case is about: who reads fc.weight.
    assert (weights_in_delegates > 0) == (reader != "pytorch"), reader
    in_pytorch = [
        n
        for n in program.graph.nodes
        if n.op == "call_function"
        and n.target is not nativert.call_delegate
        and any(getattr(a, "name", "") == "p_fc_weight" for a in n.args)
    ]
    assert bool(in_pytorch) == (reader != "delegate"), reader

    events = []
    executor = _Watched(program, events)
    first, second = two_weight_sets(model)
    with torch.no_grad():
        before = executor(x)
        executor.stage_weights(second)
        assert events == [] and torch.equal(executor(x), before)  # staged: nothing switched
        assert executor.commit_weights() == 1
    # Every delegate that reads a weight switched, then one generation was published.
    switched = [("commit", r.lowered.module_name) for r in executor._runners if r.sources]
    assert len(switched) == (1 if weights_in_delegates else 0)
    assert events == [*switched, ("publish", 1)], events
    assert executor.weights_version == 1
    model.load_state_dict(second)
    with torch.no_grad():
        assert_close(executor(x), model(x), what=f"after the commit ({reader})")


class KeywordAndNested(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x, pair, *, scale):
        return self.fc(x) * scale + pair[0] - pair[1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scale": torch.float64}, r"input 'scale' has dtype torch.float64, expected"),
        ({"pair[0]": torch.float64}, r"input 'pair\[0\]' has dtype torch.float64, expected"),
        ({"scale": (2, 5)}, r"input 'scale' has size 5 in dimension 1, expected 4"),
        ({"pair[1]": (3, 4)}, r"input 'pair\[1\]' has size 3 in dimension 0, expected 2"),
    ],
    ids=["keyword_dtype", "nested_dtype", "keyword_shape", "nested_shape"],
)
def test_a_wrong_keyword_or_nested_input_of_a_static_program_gets_our_error(change, message):
    """All static: the fast path takes plain positional tensors; keywords and nesting go
    the other way, which must check them too before a runtime sees them."""
    inputs = {
        "x": torch.randn(2, 4),
        "pair[0]": torch.randn(2, 4),
        "pair[1]": torch.randn(2, 4),
        "scale": torch.randn(2, 4),
    }

    def call(target, values):
        return target(values["x"], (values["pair[0]"], values["pair[1]"]), scale=values["scale"])

    model = KeywordAndNested().eval()
    program = torch.export.export(
        model, (inputs["x"], (inputs["pair[0]"], inputs["pair[1]"])), {"scale": inputs["scale"]}
    )
    executor = nativert.Executor(nativert.to_backend(program))
    with torch.no_grad():
        assert_close(call(executor, inputs), call(model, inputs))
    ((name, what),) = change.items()
    bad = dict(inputs)
    bad[name] = inputs[name].to(what) if isinstance(what, torch.dtype) else torch.randn(*what)
    with pytest.raises(nativert.DelegateCallError, match=message):
        call(executor, bad)

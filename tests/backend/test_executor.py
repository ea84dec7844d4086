"""Executor: same results as program.module() and eager, input checks, atomic weight swaps
under concurrent traffic, frames, profile."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.export import Dim

import nativert
from tests.conftest import assert_close
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
    program = nativert.to_backend(torch.export.export(model, inputs, **export_kwargs))
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
    ],
    ids=["dtype", "rank", "static_dim", "too_few", "not_tensor"],
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
    errors, counts = [], {"first": 0, "second": 0}
    lock = threading.Lock()

    def caller():
        try:
            with torch.no_grad():
                for _ in range(500):
                    out = executor(x)
                    if torch.equal(out, out_first):
                        which = "first"
                    elif torch.equal(out, out_second):
                        which = "second"
                    else:
                        errors.append("a result matched neither weight set (torn)")
                        return
                    with lock:
                        counts[which] += 1
        except Exception as exc:
            errors.append(repr(exc))

    def updater():
        try:
            for i in range(20):
                executor.update_weights(second if i % 2 == 0 else first)
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=caller) for _ in range(4)]
    threads.append(threading.Thread(target=updater))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert counts["first"] + counts["second"] == 2000
    assert 1 <= executor.num_frames <= executor.max_frames


def test_frames_are_bounded():
    model, inputs = make("mlp")
    program = nativert.to_backend(torch.export.export(model, inputs))
    executor = nativert.Executor(program, num_frames=1)
    results = []
    threads = [threading.Thread(target=lambda: results.append(executor(*inputs))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and executor.num_frames == 1
    with pytest.raises(nativert.NativertError, match="num_frames must be >= 1"):
        nativert.Executor(program, num_frames=-1)


def test_profile_times_every_node_and_names_delegates(mlp_executor):
    _, inputs, executor = mlp_executor
    table = executor.profile(*inputs, warmup=1, runs=5)
    delegates = [row for row in table if row.delegate]
    assert [row.delegate for row in delegates] == ["onnxruntime"]
    assert all(row.median_us > 0 for row in table)
    assert "delegate 'onnxruntime'" in str(table)

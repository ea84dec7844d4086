"""The onnxruntime delegate's outputs: their memory is reused only after the caller let go.

Every test keeps earlier results (as tensors, views, numpy arrays, storages, across threads)
and checks they still hold what they held when returned, while later calls run."""

from __future__ import annotations

import queue

import pytest
import torch

import nativert
from tests.conftest import assert_close, run_in_threads
from tests.models import make

pytestmark = pytest.mark.skipif(
    not nativert.get_delegate("onnxruntime").is_available(),
    reason=str(nativert.get_delegate("onnxruntime").is_available().reason),
)


@pytest.fixture(scope="module")
def mlp():
    model, (x,) = make("mlp")
    program = nativert.to_backend(
        torch.export.export(model, (x,)), nativert.AllNodePartitioner("onnxruntime")
    )
    return model, x, nativert.Executor(program)


def inputs(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 32, generator=gen) for _ in range(n)]


def test_dropped_outputs_are_reused_without_a_new_binding(mlp, monkeypatch):
    from nativert.backend.delegates.onnxruntime import executor as ort_executor

    model, x, executor = mlp
    with torch.no_grad():
        first = executor(x).data_ptr()  # dropped at once
        made = []
        monkeypatch.setattr(
            ort_executor, "OutputBuffer", lambda *a: made.append(a) or pytest.fail("new buffer")
        )
        for y in inputs(5):
            out = executor(y)
            assert out.data_ptr() == first
            assert_close(out, model(y))
            del out
    assert made == []


# What a caller keeps of an output, and how to read it back: (keep, read(kept, expected)
# -> (actual, expected)).
HOLDERS = {
    "tensor": (lambda t: t, lambda k, w: (k, w)),
    "slice": (lambda t: t[1:3], lambda k, w: (k, w[1:3])),
    "view": (lambda t: t.view(-1), lambda k, w: (k, w.view(-1))),
    "numpy": (lambda t: t.numpy(), lambda k, w: (torch.from_numpy(k), w)),
    "storage": (
        lambda t: t.untyped_storage(),
        lambda k, w: (torch.empty(0).set_(k, 0, w.shape, w.stride()), w),
    ),
    "dlpack": (lambda t: torch.utils.dlpack.to_dlpack(t), lambda k, w: (torch.from_dlpack(k), w)),
}


@pytest.mark.parametrize("holder", HOLDERS)
def test_held_outputs_are_never_overwritten(mlp, holder):
    model, _, executor = mlp
    keep, read = HOLDERS[holder]
    xs = inputs(6, seed=1)
    with torch.no_grad():
        expected = [model(x) for x in xs]
        held = []
        for x in xs:
            held.append(keep(executor(x)))
            executor(xs[0])  # dropped: its memory is free to be reused
        for _ in range(3):
            for x in xs:
                executor(x)
    for i, (kept, want) in enumerate(zip(held, expected, strict=True)):
        assert_close(*read(kept, want), what=f"result {i} kept as {holder}")


def test_outputs_held_by_another_thread_are_never_overwritten(mlp):
    """Thread A calls and hands every result to thread B, which checks them only after A is
    done: A's buffers stay busy while B holds them, and A keeps calling."""
    model, _, executor = mlp
    xs = inputs(40, seed=2)
    with torch.no_grad():
        expected = [model(x) for x in xs]
    handed: queue.SimpleQueue = queue.SimpleQueue()
    done = []

    def producer():
        with torch.no_grad():
            for i, x in enumerate(xs):
                handed.put((i, executor(x)))
                executor(xs[-1 - i])  # a dropped result in between
        done.append(True)

    def consumer():
        held = []
        while not done or not handed.empty():
            try:
                held.append(handed.get(timeout=0.05))
            except queue.Empty:
                continue
        assert len(held) == len(xs)
        for i, out in held:
            assert_close(out, expected[i], what=f"result {i}, checked late in another thread")

    run_in_threads(producer, consumer)


def test_caller_changes_to_a_dropped_output_do_not_leak(mlp):
    model, x, executor = mlp
    with torch.no_grad():
        out = executor(x)
        out.zero_()
        out.requires_grad_()
        out.note = "mine"
        del out
        again = executor(x)
        assert_close(again, model(x))
    assert not again.requires_grad and not hasattr(again, "note")


def test_output_fed_back_as_input():
    class Square(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.relu(self.fc(x))

    model, y = Square().eval(), torch.randn(2, 8)
    program = nativert.to_backend(
        torch.export.export(model, (y,)), nativert.AllNodePartitioner("onnxruntime")
    )
    executor = nativert.Executor(program)
    expected = y
    with torch.no_grad():
        for step in range(5):
            expected = model(expected)
            y = executor(y)  # the input is the last output: ORT must not write over it
            assert_close(y, expected, what=f"step {step}")


def test_outputs_from_inference_mode_can_be_updated_outside_it(mlp):
    _, x, executor = mlp
    with torch.inference_mode():
        out = executor(x)
    out += 1  # a normal tensor: allowed outside inference mode


def test_the_private_onnxruntime_names_nativert_calls_exist():
    """The delegate calls ORT's C++ session and binding under their Python wrappers (see
    `_Native`): if this fails, an onnxruntime release renamed them."""
    import onnxruntime as ort

    model, x = make("mlp")[0], make("mlp")[1][0]
    program = nativert.to_backend(
        torch.export.export(model, (x,)), nativert.AllNodePartitioner("onnxruntime")
    )
    (lowered,) = nativert.lowered_modules(program)
    session = lowered.executor.active_state().session
    assert isinstance(session, ort.InferenceSession)
    assert callable(session._sess.run_with_iobinding)
    assert hasattr(session.io_binding()._iobinding, "bind_output")
    assert ort.OrtDevice.make("cpu", 0)._get_c_device() is not None

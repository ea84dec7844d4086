"""The delegate contract: every available delegate runs the same checks.

Numerics against eager on a small multi-output graph, at several batch sizes of one dynamic
program; the weight life cycle (process stages, commit switches, bad weights change
nothing); 4 concurrent callers with fresh inputs; save -> load -> run; outputs that never
alias inputs, weights or each other; and one loaded executor per segment per runner.

Each delegate compiles two programs, shared by its checks (module-scoped), so AOTInductor's
seconds-long compiles happen twice.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim
from torch.multiprocessing.reductions import StorageWeakRef

import nativert
from tests.conftest import assert_close, run_in_threads

DELEGATES = ["eager", "onnxruntime", "openvino", "aoti", "tensorrt"]


class Dense(nn.Module):
    """Two outputs, two layers, a reduction: small, but every kind of node a segment has."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor):
        h = torch.relu(self.fc1(x))
        return self.fc2(h), h.sum(dim=1)


class Aliasing(nn.Module):
    """A segment whose reference graph returns aliases: a value and a view of it, a view of
    a weight and a view of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor):
        y = torch.relu(x) * self.scale
        return y, y.view(2, 2), self.scale.view(2, 2), x.view(2, 2)


@pytest.fixture(scope="module", params=DELEGATES)
def delegate(request):
    backend_id = request.param
    availability = nativert.get_delegate(backend_id).is_available()
    if not availability:
        pytest.skip(f"{backend_id}: {availability.reason}")
    return backend_id


def _device(backend_id: str) -> str:
    return "cuda" if backend_id == "tensorrt" else "cpu"


@pytest.fixture(scope="module")
def dense(delegate):
    """(model, a dynamic-batch program lowered whole to `delegate`, device)."""
    torch.manual_seed(0)
    device = _device(delegate)
    model = Dense().eval().to(device)
    x = torch.randn(4, 8, device=device)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch", max=64)},))
    lowered = nativert.to_backend(program, nativert.AllNodePartitioner(delegate), strict=True)
    (segment,) = nativert.lowered_modules(lowered)
    assert segment.backend_id == delegate
    return model, lowered, device


@pytest.fixture(scope="module")
def aliasing(delegate):
    torch.manual_seed(0)
    device = _device(delegate)
    model = Aliasing().eval().to(device)
    x = torch.randn(4, device=device)
    program = torch.export.export(model, (x,))
    lowered = nativert.to_backend(program, nativert.AllNodePartitioner(delegate), strict=True)
    return model, lowered, x


def _executor(program):
    """The segment's delegate executor, loaded and bound to the segment's own weights."""
    (segment,) = nativert.lowered_modules(program)
    executor = segment.load_executor()
    reference = segment.original_module
    executor.init_weights({n: reference.state_dict[n] for n in segment.weight_names})
    return segment, executor


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_numerics_match_eager_at_every_batch(dense, batch):
    model, program, device = dense
    x = torch.randn(batch, 8, device=device)
    with torch.no_grad():
        expected = model(x)
        assert_close(nativert.Executor(program)(x), expected, what="Executor")
        assert_close(program.module()(x), expected, what=".module()")


def test_process_stages_commit_switches_and_bad_weights_change_nothing(dense):
    model, program, device = dense
    segment, executor = _executor(program)
    x = torch.randn(5, 8, device=device)
    with torch.no_grad():
        old = model(x)
        new_weights = {n: torch.randn_like(t) for n, t in model.state_dict().items()}
        new = torch.func.functional_call(model, new_weights, (x,))
        executor.process_weights(new_weights)
        assert_close(executor.run([x]), old, what="after process, before commit")
        executor.commit_weights()
        assert_close(executor.run([x]), new, what="after commit")

        bad = {**new_weights, "fc1.weight": torch.randn(3, 3, device=device)}
        with pytest.raises(nativert.WeightsError, match="fc1.weight"):
            executor.process_weights(bad)
        assert_close(executor.run([x]), new, what="after a rejected update")


def test_four_concurrent_callers_with_fresh_inputs(dense):
    model, program, device = dense
    executor = nativert.Executor(program)

    def caller(k: int) -> None:
        gen = torch.Generator().manual_seed(k)
        inputs = [torch.randn(k + 1, 8, generator=gen).to(device) for _ in range(20)]
        with torch.no_grad():
            expected = [model(x) for x in inputs]
            for _ in range(3):
                for i, x in enumerate(inputs):
                    assert_close(executor(x), expected[i], what=f"caller {k} input {i}")

    run_in_threads(*(lambda k=k: caller(k) for k in range(4)))


def test_save_load_run(dense, tmp_path):
    model, program, device = dense
    nativert.save(program, tmp_path / "model.pt2")
    # Made here, so trusted: aoti and tensorrt payloads are native code.
    loaded = nativert.load(tmp_path / "model.pt2", trust_native_code=True)
    (segment,) = nativert.lowered_modules(loaded)
    assert segment.reference_reason is None, segment.reference_reason
    x = torch.randn(6, 8, device=device)
    with torch.no_grad():
        assert_close(nativert.Executor(loaded)(x), model(x))


def test_outputs_never_alias_inputs_weights_or_each_other(aliasing):
    model, program, x = aliasing
    segment, executor = _executor(program)
    weights = [segment.original_module.state_dict[n] for n in segment.weight_names]
    with torch.no_grad():
        reference = segment.run_reference([*weights, x])
        outputs = executor.run([x])
    reference_storages = {StorageWeakRef(t.untyped_storage()) for t in reference}
    assert len(reference_storages) < len(reference), "the test graph must return aliases"
    assert_close(outputs, reference)
    storages = [StorageWeakRef(t.untyped_storage()) for t in outputs]
    assert len(set(storages)) == len(outputs), "two outputs share storage"
    taken = {StorageWeakRef(x.untyped_storage())} | {
        StorageWeakRef(w.untyped_storage()) for w in segment.original_module.state_dict.values()
    }
    assert not taken & set(storages), "an output shares storage with an input or weight"
    for out in outputs:  # nor with anything the executor keeps (its own weight copies)
        out.add_(1.0)
    with torch.no_grad():
        assert_close(executor.run([x]), reference, what="after the caller changed the outputs")


def test_one_executor_per_segment_per_runner(dense, count_loads):
    _, program, device = dense
    (segment,) = nativert.lowered_modules(program)
    loads = count_loads(segment.backend_id)
    first, second = nativert.Executor(program), nativert.Executor(program)
    assert loads == [segment.backend_id] * 2
    x = torch.randn(2, 8, device=device)
    with torch.no_grad():
        first(x), second(x), first(x)
    assert len(loads) == 2, "calls must not load anything"

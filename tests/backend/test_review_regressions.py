"""Regressions for bugs a review found: each test failed before its fix."""

from __future__ import annotations

import copy
import threading
import zipfile

import pytest
import torch

import nativert
from tests.conftest import assert_close
from tests.models import make


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


class Wrapper(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 2


@pytest.fixture
def exported_wrapper():
    """A wrapper around an owning lowered module, exported: program weight names
    (inner.fc1_weight) differ from the segment's (fc1.weight)."""
    model, inputs = make("mlp")
    lowered = nativert.to_backend("onnxruntime", torch.export.export(model, inputs))
    return model, inputs, torch.export.export(Wrapper(lowered), inputs)


def test_executor_updates_weights_of_an_exported_wrapper(exported_wrapper):
    model, inputs, program = exported_wrapper
    executor = nativert.Executor(program)
    new = {k: torch.randn_like(v) for k, v in executor.weights().items()}
    executor.update_weights(new)
    model.load_state_dict(
        {k.removeprefix("inner.").replace("_", ".", 1): v for k, v in new.items()}
    )
    with torch.no_grad():
        assert_close(executor(*inputs), model(*inputs) * 2)


def test_exported_wrapper_saves_and_loads(exported_wrapper, tmp_path):
    model, inputs, program = exported_wrapper
    nativert.save(program, tmp_path / "w.pt2")
    loaded = nativert.load(tmp_path / "w.pt2")
    with torch.no_grad():
        assert_close(nativert.Executor(loaded)(*inputs), model(*inputs) * 2)


def test_corrupted_payload_is_a_package_error(tmp_path):
    model, inputs = make("mlp")
    nativert.save(nativert.to_backend(torch.export.export(model, inputs)), tmp_path / "m.pt2")
    from tests.backend.test_package import rewrite

    with zipfile.ZipFile(tmp_path / "m.pt2") as archive:
        payload = next(n for n in archive.namelist() if n.endswith("nativert/0.bin"))
    rewrite(tmp_path / "m.pt2", tmp_path / "bad.pt2", {payload.split("/", 1)[1]: b"garbage"})
    with pytest.raises(nativert.PackageError, match=r"bad.pt2: cannot restore the delegates"):
        nativert.load(tmp_path / "bad.pt2")


def test_deep_copies_with_different_weights_never_mix_under_threads():
    model, (x,) = make("mlp")
    a = nativert.to_backend("onnxruntime", torch.export.export(model, (x,)))
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.neg_()
        expected_a, expected_b = a(x), b(x)
    assert not torch.allclose(expected_a, expected_b)
    errors = []

    def call(module, expected):
        with torch.no_grad():
            for _ in range(300):
                if not torch.allclose(module(x), expected, atol=1e-6):
                    errors.append("a result used the other copy's weights")
                    return

    threads = [
        threading.Thread(target=call, args=(a, expected_a)),
        threading.Thread(target=call, args=(b, expected_b)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


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


def test_package_from_another_delegate_version_falls_back(tmp_path):
    import json

    from tests.backend.test_package import rewrite

    model, inputs = make("mlp")
    nativert.save(nativert.to_backend(torch.export.export(model, inputs)), tmp_path / "m.pt2")
    with zipfile.ZipFile(tmp_path / "m.pt2") as archive:
        name = next(n for n in archive.namelist() if n.endswith("nativert/manifest.json"))
        manifest = json.loads(archive.read(name))
    manifest["delegates"][0]["delegate_version"] = "0-old"
    rewrite(
        tmp_path / "m.pt2",
        tmp_path / "old.pt2",
        {name.split("/", 1)[1]: json.dumps(manifest).encode()},
    )
    with pytest.warns(RuntimeWarning, match=r"written by delegate version '0-old'"):
        loaded = nativert.load(tmp_path / "old.pt2")
    with torch.no_grad():
        assert_close(nativert.Executor(loaded)(*inputs), model(*inputs))
    with pytest.raises(nativert.PackageError, match="'0-old'.*strict"):
        nativert.load(tmp_path / "old.pt2", strict=True)

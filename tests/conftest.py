"""Shared test helpers: comparisons that check shape and dtype before values, and fixtures."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

import nativert

# torch.compile(backend="nativert") caches payloads on disk: never in the user's home from
# tests. One directory per test session (subprocesses inherit it); tests that test the cache
# pass their own cache_dir.
os.environ["NATIVERT_CACHE_DIR"] = tempfile.mkdtemp(prefix="nativert-test-cache-")

FLOAT32 = {"atol": 1e-5, "rtol": 1e-5}


def assert_close(actual, expected, *, atol: float = 1e-5, rtol: float = 1e-5, what: str = "output"):
    """Compare pytrees of tensors: structure, shape, dtype, then values (with error sizes)."""
    flat_a, spec_a = torch.utils._pytree.tree_flatten(actual)
    flat_e, spec_e = torch.utils._pytree.tree_flatten(expected)
    assert spec_a == spec_e, f"{what}: structure {spec_a} != expected {spec_e}"
    for i, (a, e) in enumerate(zip(flat_a, flat_e, strict=True)):
        label = f"{what}[{i}]"
        assert a.shape == e.shape, f"{label}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert a.dtype == e.dtype, f"{label}: dtype {a.dtype} != {e.dtype}"
        if not torch.allclose(a, e, atol=atol, rtol=rtol):
            diff = (a - e).abs()
            rel = diff / e.abs().clamp_min(1e-12)
            raise AssertionError(
                f"{label}: max abs error {diff.max().item():.3e}, max rel error "
                f"{rel.max().item():.3e} (atol={atol}, rtol={rtol})"
            )


def assert_same_gradients(module, reference, *, atol: float = 1e-5, rtol: float = 1e-5):
    """Every parameter of `reference` has a gradient in `module` (by name) equal to its own.

    The two must not share parameters: a program exported from a model shares the model's
    Parameter objects, so `program.module()` and the model would accumulate both backward
    passes into one `.grad` and compare it with itself. Run the reference on a
    `copy.deepcopy` of the model."""
    got = dict(module.named_parameters())
    for name, param in reference.named_parameters():
        assert name in got, f"{name}: not a parameter of the module under test"
        mine = got[name]
        assert mine is not param and mine.data_ptr() != param.data_ptr(), (
            f"{name}: shared with the reference, so its gradients cannot be compared; "
            "run the reference on a copy.deepcopy of the model"
        )
        assert mine.grad is not None, f"no gradient reached {name}"
        assert param.grad is not None, f"the reference has no gradient for {name}"
        assert_close(mine.grad, param.grad, atol=atol, rtol=rtol, what=f"grad {name}")


@pytest.fixture
def registered():
    """Register delegates for one test and always unregister them, even on failure."""
    added: list[str] = []

    def register(delegate):
        nativert.register_delegate(delegate)
        added.append(delegate.backend_id)
        return delegate

    yield register
    for backend_id in added:
        nativert.unregister_delegate(backend_id)


def run_in_threads(*targets, timeout: float = 120.0) -> None:
    """Run each callable in its own thread, all started together, and re-raise the first
    exception any of them raised (under pytest an exception in a thread is only a warning, so
    a test that merely joins its threads passes when every worker crashes). Fails if a thread
    is still running after `timeout` seconds."""
    import threading
    import time

    errors: list[BaseException] = []
    barrier = threading.Barrier(len(targets))

    def guarded(fn):
        def run():
            try:
                barrier.wait(timeout)
                fn()
            except BaseException as exc:  # collected, re-raised in the test's thread
                errors.append(exc)

        return run

    threads = [threading.Thread(target=guarded(fn), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = sum(t.is_alive() for t in threads)
    if alive:
        raise AssertionError(f"{alive} of {len(threads)} threads still running after {timeout} s")
    if errors:
        raise errors[0]


@pytest.fixture
def count_loads(monkeypatch):
    """count_loads(backend_id) -> a list that records every executor that delegate loads
    (a spy around the real Delegate.load)."""

    def start(backend_id: str) -> list[str]:
        delegate = nativert.get_delegate(backend_id)
        loads: list[str] = []
        original = type(delegate).load

        def counted(self, *args, **kwargs):
            loads.append(self.backend_id)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(type(delegate), "load", counted)
        return loads

    return start

"""`nativert demo`: lower the built-in models and check them against eager."""

from __future__ import annotations

import argparse
import time

import torch

DEMO_TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def _median_us(fn, args, runs: int = 50) -> float:
    with torch.no_grad():
        for _ in range(5):
            fn(*args)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e6


def demo(args: argparse.Namespace) -> int:
    import nativert
    from nativert.models import BUILTIN_MODELS, build

    print(
        f"nativert {nativert.__version__} on torch {torch.__version__}; "
        f"delegates available: {', '.join(nativert.list_delegates(available_only=True))}"
    )
    failures = 0
    for name in BUILTIN_MODELS:
        model, inputs = build(name)
        program = torch.export.export(model, inputs)
        delegated = nativert.to_backend(program)
        print(f"\n[{name}]")
        print(nativert.delegation_report(delegated))
        runnable = nativert.Executor(delegated)
        with torch.no_grad():
            expected, got = model(*inputs), runnable(*inputs)
        err = (expected - got).abs().max().item()
        ok = expected.shape == got.shape and torch.allclose(got, expected, **DEMO_TOLERANCE)
        failures += not ok
        eager_us, nrt_us = _median_us(model, inputs), _median_us(runnable, inputs)
        print(
            f"  numerics vs eager: {'OK' if ok else 'MISMATCH'} (max abs error {err:.2e}, "
            f"atol {DEMO_TOLERANCE['atol']})"
        )
        print(
            f"  median latency: eager {eager_us:.0f} us, nativert Executor {nrt_us:.0f} us "
            f"(speed-up x{eager_us / nrt_us:.2f})"
        )
    print("\ndemo:", "all models match eager" if not failures else f"{failures} model(s) MISMATCH")
    return 1 if failures else 0

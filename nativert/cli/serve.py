"""`nativert serve PACKAGE` (deploy on Ray Serve and wait for Ctrl-C) and `nativert serve
update-weights URL FILE` (swap weights on every replica of a running server, or none)."""

from __future__ import annotations

import argparse
import json
import signal
import threading
import urllib.error
import urllib.request
from pathlib import Path

from nativert.cli.errors import CliError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def serve(args: argparse.Namespace) -> int:
    import nativert.serve

    try:
        nativert.serve.require_serve_extra()
    except ImportError as exc:
        raise CliError(str(exc)) from None
    handle = nativert.serve.deploy(
        args.package,
        replicas=args.replicas,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        threads=args.threads,
        trust_native_code=args.trust_native_code,
        host=args.host,
        port=args.port,
        address=args.address,
    )
    info = handle.metadata()
    batching = info["batching"]
    how = (
        f"batching up to {batching['max_batch_size']} within {batching['batch_wait_ms']:g} ms"
        if batching["enabled"]
        else f"no batching ({batching['reason'] if not batching['possible'] else 'off'})"
    )
    print(
        f"serving {args.package} at {handle.url}/ ({args.replicas} replica(s), {how}; "
        f"weights version {info['weights_version']}). Ctrl-C stops.",
        flush=True,
    )
    stop = threading.Event()
    # Ctrl-C and SIGTERM ask to stop; Python would ignore a SIGINT that the shell set to be
    # ignored (a background job), so both get a handler. A second Ctrl-C interrupts shutdown.
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in STOP_SIGNALS}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("stopping...", flush=True)
        handle.shutdown()  # drains and deletes the application and its coordinator
        if args.address is None:  # we started this cluster: take it, and Serve, down with us
            import ray

            ray.shutdown()
    print("stopped")
    return 0


def update_weights(args: argparse.Namespace) -> int:
    path = Path(args.weights)
    if not path.is_file():
        raise CliError(f"no such weights file: {path}")
    url = args.url.rstrip("/") + "/weights" + ("" if args.strict else "?strict=false")
    request = urllib.request.Request(
        url,
        data=path.read_bytes(),
        headers={"content-type": "application/octet-stream"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as answer:
            result = json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read())["error"]
        except (ValueError, KeyError):
            error = str(exc)
        raise CliError(f"{url}: HTTP {exc.code}: {error}") from None
    except urllib.error.URLError as exc:
        raise CliError(f"{url}: {exc.reason}") from None
    print(f"weights version {result['version']} on {len(result['replicas'])} replica(s)")
    return 0

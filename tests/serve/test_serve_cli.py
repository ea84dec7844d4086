"""`nativert serve` as a user runs it: a process that starts its own Ray cluster, answers the
README's curl request, and exits cleanly (status 0, Ray stopped) on Ctrl-C (SIGINT)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from torch.export import Dim

pytest.importorskip("ray.serve", reason="needs the serve extra: pip install 'nativert[serve]'")
requests = pytest.importorskip("requests")

import nativert  # noqa: E402

START_S = 120.0


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return torch.tanh(self.fc(x))


@pytest.mark.slow
def test_serve_command_answers_and_stops_on_ctrl_c(tmp_path):
    torch.manual_seed(0)
    model = Small().eval()
    x = torch.randn(2, 8)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch")},))
    path = tmp_path / "model.pt2"
    nativert.save(nativert.to_backend(ep), str(path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "nativert", "serve", str(path), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        before = []
        for _ in range(50):  # blocks until the server says where it is
            first = server.stdout.readline()
            if not first or first.startswith("serving"):
                break
            before.append(first)
        assert first.startswith(f"serving {path} at http://127.0.0.1:{port}/"), before + [first]
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + START_S
        while True:
            try:
                answer = requests.post(url, json={"inputs": {"x": x.tolist()}}, timeout=30)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "the server never answered"
                time.sleep(0.5)
        assert answer.status_code == 200, answer.text
        got = torch.tensor(answer.json()["outputs"]["output"]["data"])
        with torch.no_grad():
            torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)
        server.send_signal(signal.SIGINT)
        rest, _ = server.communicate(timeout=60)
        assert server.returncode == 0, first + rest
        assert rest.rstrip().endswith("stopped"), rest
        assert "Traceback" not in rest, rest
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

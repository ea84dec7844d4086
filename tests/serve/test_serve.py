"""nativert.serve on a real local Ray cluster (loopback, 2 CPUs, one per module) with real
ONNX Runtime replicas: HTTP and handle traffic, batching, fleet-wide weight swaps.

Every output is compared with eager PyTorch under the weights of the version the response
reports (atol = rtol = 1e-5), and with the in-process Executor's output for version 0."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.export import Dim

pytest.importorskip("ray.serve", reason="needs the serve extra: pip install 'nativert[serve]'")
requests = pytest.importorskip("requests")
import ray  # noqa: E402
from ray import serve  # noqa: E402
from safetensors.torch import load as st_load  # noqa: E402
from safetensors.torch import save as st_save  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import nativert  # noqa: E402
import nativert.serve  # noqa: E402
from tests.conftest import assert_close  # noqa: E402

REQUESTS = 500
WORKERS = 32
DEADLINE_S = 60.0  # every load loop stops at REQUESTS or at this, whichever comes first


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(3, 16)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch", max=1024)},))
    program = nativert.to_backend(ep)
    assert [d.backend_id for d in nativert.lowered_modules(program)] == ["onnxruntime"]
    folder = tmp_path_factory.mktemp("serve")
    path = folder / "mlp.pt2"
    nativert.save(program, str(path))
    static_path = folder / "static.pt2"
    nativert.save(nativert.to_backend(torch.export.export(model, (x,))), str(static_path))
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        handle = nativert.serve.deploy(
            path, replicas=2, max_batch_size=8, batch_wait_ms=10, threads=2, port=port
        )
        static = nativert.serve.deploy(
            static_path, replicas=1, port=port, name="static", route_prefix="/static"
        )
        weights = {0: {k: v.clone() for k, v in model.state_dict().items()}}
        yield {
            "model": model,
            "handle": handle,
            "static": static,
            "url": f"http://127.0.0.1:{port}",
            "weights": weights,
            "executor": nativert.Executor(nativert.load(str(path))),
            "folder": folder,
        }
    finally:
        serve.shutdown()
        ray.shutdown()


def eager(served, version: int, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.func.functional_call(served["model"], served["weights"][version], (x,))


def post_json(url: str, x: torch.Tensor, **kwargs) -> requests.Response:
    body = {"inputs": {"x": {"dtype": "float32", "data": x.tolist()}}}
    return requests.post(url + "/predict", json=body, timeout=30, **kwargs)


def hammer(call, count: int = REQUESTS) -> list:
    """`call(i)` from WORKERS threads, at most `count` calls and DEADLINE_S seconds."""
    stop = time.monotonic() + DEADLINE_S

    def bounded(i):
        return call(i) if time.monotonic() < stop else None

    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(bounded, range(count)))


def inputs(count: int = REQUESTS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1 + i % 3, 16, generator=g) for i in range(count)]


def test_http_500_concurrent_requests_all_answered_and_match(served):
    xs = inputs()
    answers = hammer(lambda i: post_json(served["url"], xs[i]))
    assert all(a is not None and a.status_code == 200 for a in answers), "lost requests"
    replicas, sizes = set(), []
    for x, answer in zip(xs, answers, strict=True):
        body = answer.json()
        out = body["outputs"]["output"]
        got = torch.tensor(out["data"], dtype=getattr(torch, out["dtype"]))
        assert body["weights_version"] == 0
        assert_close(got, served["executor"](x))
        assert_close(got, eager(served, 0, x))
        replicas.add(body["replica"])
        sizes.append(body["batch_size"])
    assert len(replicas) == 2
    assert max(sizes) > 1, f"no request was batched: sizes {sorted(set(sizes))}"


def test_handle_500_concurrent_calls_all_answered_and_match(served):
    xs = inputs()
    responses = [served["handle"].remote(x) for x in xs]
    stop = time.monotonic() + DEADLINE_S
    predictions = [r.result(timeout_s=max(1.0, stop - time.monotonic())) for r in responses]
    for x, p in zip(xs, predictions, strict=True):
        assert p.weights_version == 0
        assert_close(p.outputs, served["executor"](x))
    assert max(p.batch_size for p in predictions) > 1
    seen = served["handle"].metadata()["batching"]["batch_sizes_seen"]
    assert any(int(size) > 1 for size in seen)


def test_safetensors_in_and_out(served):
    x = torch.randn(5, 16)
    answer = requests.post(
        served["url"] + "/predict",
        data=st_save({"x": x}),
        headers={"content-type": "application/octet-stream"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-weights-version"] == "0"
    assert_close(st_load(answer.content)["output"], eager(served, 0, x))


def test_metadata(served):
    info = requests.get(served["url"] + "/metadata", timeout=30).json()
    assert info["package"] == "mlp.pt2"
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 16]}]
    assert info["outputs"] == [{"dtype": "float32", "shape": ["batch", 4]}]
    assert [d["backend_id"] for d in info["delegates"]] == ["onnxruntime"]
    assert info["batching"]["enabled"] and info["batching"]["max_batch_size"] == 8
    assert info["weights_version"] == served["handle"].status()["version"]


def test_static_batch_dim_turns_batching_off(served):
    info = requests.get(served["url"] + "/static/", timeout=30).json()
    assert not info["batching"]["enabled"]
    assert "static" in info["batching"]["reason"]
    x = torch.randn(3, 16)
    answers = hammer(lambda i: post_json(served["url"] + "/static", x), count=40)
    assert {a.json()["batch_size"] for a in answers} == {1}
    got = torch.tensor(answers[0].json()["outputs"]["output"]["data"])
    assert_close(got, eager(served, 0, x))


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"inputs": {"y": [[1.0] * 16]}}, 400, r"missing \['x'\], unknown \['y'\]"),
        (
            {"inputs": {"x": [[1.0] * 15]}},
            400,
            r"input 'x' has size 15 in dimension 1, expected 16",
        ),
        (
            {"inputs": {"x": {"data": [[1] * 16], "dtype": "int64"}}},
            400,
            r"input 'x' has dtype torch.int64, expected torch.float32",
        ),
        (
            {"inputs": {"x": {"data": [[1.0] * 16], "dtype": "float99"}}},
            400,
            r"input 'x': unknown dtype 'float99'",
        ),
        ({"inputs": {"x": [[1.0] * 16, [1.0]]}}, 400, r"input 'x': not a tensor of float32"),
        ({"inputs": [1, 2]}, 400, r"expected 1 inputs \(x\), got 2"),
    ],
    ids=["unknown_name", "wrong_width", "wrong_dtype", "bad_dtype", "ragged", "count"],
)
def test_bad_requests_get_4xx_naming_the_input(served, body, status, message):
    import re

    answer = requests.post(served["url"] + "/predict", json=body, timeout=30)
    assert answer.status_code == status, answer.text
    assert re.search(message, answer.json()["error"]), answer.json()["error"]


def test_bad_weight_file_leaves_every_replica_on_the_old_version(served):
    handle = served["handle"]
    before = handle.status()
    bad = {k: torch.randn_like(v) for k, v in served["weights"][0].items()}
    bad["fc1.weight"] = torch.randn(2, 2)
    answer = requests.post(served["url"] + "/weights", data=st_save(bad), timeout=60)
    assert answer.status_code == 400, answer.text
    assert (
        "fc1.weight" in answer.json()["error"] and "nothing was committed" in answer.json()["error"]
    )
    answer = requests.post(served["url"] + "/weights", data=b"not safetensors", timeout=60)
    assert answer.status_code == 400 and "safetensors" in answer.json()["error"]
    with pytest.raises(nativert.WeightsError, match="missing"):
        handle.update_weights({"fc1.weight": bad["fc2.weight"][:0]})
    assert handle.status() == before
    assert set(before["replicas"].values()) == {before["version"]}


@pytest.mark.slow
def test_weight_update_under_load_never_mixes_versions(served):
    handle, url = served["handle"], served["url"]
    old = handle.status()["version"]
    torch.manual_seed(5)
    new_weights = {k: torch.randn_like(v) for k, v in served["weights"][0].items()}
    served["weights"][old + 1] = new_weights
    path = served["folder"] / "new.safetensors"
    save_file(new_weights, str(path))
    xs = inputs()
    result = {}

    def call(i):
        if i == REQUESTS // 4:  # from the CLI, mid-traffic
            from nativert.cli import main

            result["rc"] = main(["serve", "update-weights", url, str(path)])
        return post_json(url, xs[i]).json()

    answers = hammer(call)
    assert result["rc"] == 0
    versions = set()
    for x, body in zip(xs, answers, strict=True):
        version = body["weights_version"]
        versions.add(version)
        out = body["outputs"]["output"]
        assert_close(torch.tensor(out["data"]), eager(served, version, x), what=f"v{version}")
    assert versions <= {old, old + 1} and old + 1 in versions
    status = handle.status()
    assert status["version"] == old + 1 and set(status["replicas"].values()) == {old + 1}
    # and each replica says so itself, on HTTP
    seen = {}
    for _ in range(50):
        body = requests.get(url + "/", timeout=30).json()
        seen[body["replica"]] = body["weights_version"]
        if len(seen) == 2:
            break
    assert seen and set(seen.values()) == {old + 1}, seen


def test_a_package_that_cannot_load_says_why(served, tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a package")
    with pytest.raises(nativert.PackageError, match="bad.pt2"):
        nativert.serve.deploy(bad, port=int(served["url"].rsplit(":", 1)[1]), name="bad")

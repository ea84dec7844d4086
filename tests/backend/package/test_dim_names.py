"""What `nativert inspect` shows: the user's Dim names (kept in the manifest, since torch does
not save them) and each output's pytree path, not torch's symbols and node names."""

from __future__ import annotations

import json

import pytest
import torch
from torch.export import Dim

import nativert
from nativert import cli
from nativert.backend.package import read_manifest
from nativert.backend.package.manifest import dim_names
from tests.backend.package.crafting import MANIFEST, read_members, rewrite


class TwoInputs(torch.nn.Module):
    """Two inputs sharing a named batch dim, one unnamed (AUTO) dim, and a dict output."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x, y):
        h = self.fc(x)
        return {"logits": h + y, "pair": torch.cat([h, h], dim=0), "width": h.sum(-1)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    batch = Dim("batch", min=1, max=1024)
    shapes = ({0: batch}, {0: batch})
    program = torch.export.export(
        TwoInputs(), (torch.randn(3, 4), torch.randn(3, 4)), dynamic_shapes=shapes
    )
    path = tmp_path_factory.mktemp("dims") / "dims.pt2"
    nativert.save(nativert.to_backend(program), path)
    return program, path


def test_dim_names_are_read_from_the_export(saved):
    program, _ = saved
    (symbol,) = program.range_constraints
    assert dim_names(program) == {str(symbol): "batch"}


def test_unnamed_dims_have_no_name():
    auto = ({0: Dim.AUTO}, {0: Dim.AUTO})
    program = torch.export.export(
        TwoInputs(), (torch.randn(3, 4), torch.randn(3, 4)), dynamic_shapes=auto
    )
    assert program.range_constraints  # dynamic, but nobody named the dim
    assert dim_names(program) == {}


def test_dim_names_are_saved_and_survive_a_load_and_save(saved, tmp_path):
    _, path = saved
    names = read_manifest(path)["dim_names"]
    assert list(names.values()) == ["batch"]
    again = tmp_path / "again.pt2"
    nativert.save(nativert.load(path), again)
    assert read_manifest(again)["dim_names"] == names


def test_inspect_shows_dim_names_and_output_paths(saved, capsys):
    _, path = saved
    assert cli.main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [i["shape"] for i in info["inputs"]] == [["batch", 4], ["batch", 4]]
    assert info["dims"] == {"batch": {"min": 1, "max": 1024}}
    assert info["output_type"] == "builtins.dict"
    outputs = {o["name"]: o["shape"] for o in info["outputs"]}
    assert outputs == {
        "['logits']": ["batch", 4],
        "['pair']": ["2*batch", 4],
        "['width']": ["batch"],
    }

    assert cli.main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "input x: float32 [batch, 4]" in text
    assert "dims: batch[1, 1024]" in text
    assert "output ['pair']: float32 [2*batch, 4]" in text


def test_a_tuple_output_shows_positions(tmp_path, capsys):
    class Pair(torch.nn.Module):
        def forward(self, x):
            return x + 1, x * 2

    path = tmp_path / "pair.pt2"
    nativert.save(nativert.to_backend(torch.export.export(Pair(), (torch.randn(2),))), path)
    assert cli.main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [o["name"] for o in info["outputs"]] == ["[0]", "[1]"]
    assert info["dims"] == {}


def test_a_malformed_dim_name_is_refused(saved, tmp_path):
    _, path = saved
    _, members = read_members(path)
    manifest = json.loads(members[MANIFEST])
    manifest["dim_names"] = {"s0": "\x1b[31mred"}  # printed by inspect: no terminal codes
    hostile = tmp_path / "hostile.pt2"
    rewrite(path, hostile, {MANIFEST: json.dumps(manifest).encode()})
    with pytest.raises(nativert.PackageError, match="malformed dim_names table"):
        nativert.load(hostile)

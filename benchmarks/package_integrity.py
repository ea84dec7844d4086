"""What checking a package costs: save and load of a ~100 MB package, with the part of each
that is the integrity work (SHA-256 of every member at save; CRC-32 + SHA-256 at load).

    python benchmarks/package_integrity.py [--mb 100] [--rounds 5]

Writes benchmarks/results/package_integrity.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
import zipfile

import torch
from _harness import machine, write

import nativert
from nativert.backend.package.archive import digest_members


class Wide(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.a = torch.nn.Linear(width, width)
        self.b = torch.nn.Linear(width, width)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    width = int((args.mb * 2**20 / 4 / 2) ** 0.5)  # two width x width float32 layers
    model, x = Wide(width).eval(), torch.randn(2, width)
    program = nativert.to_backend(torch.export.export(model, (x,)), cache_dir=None)
    directory = tempfile.mkdtemp()
    path = os.path.join(directory, "wide.pt2")
    nativert.save(program, path)
    size_mb = os.path.getsize(path) / 2**20

    def read_with_crc():  # what zipfile's CRC-32 check costs on its own: read every member
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                archive.read(info)

    def sha_only():
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                hashlib.sha256(archive.read(info)).hexdigest()

    samples: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, fn in (
            ("save", lambda: nativert.save(program, path)),
            ("digest at save", lambda: digest_members(path)),
            ("load", lambda: nativert.load(path)),
            ("read + CRC-32", read_with_crc),
            ("read + CRC-32 + SHA-256", sha_only),
        ):
            samples.setdefault(name, []).append(seconds(fn))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    with torch.no_grad():
        assert torch.allclose(nativert.Executor(nativert.load(path))(x), model(x), atol=1e-4)
    command = f"python benchmarks/package_integrity.py --mb {args.mb} --rounds {args.rounds}"
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "machine": machine(),
        "package_mb": round(size_mb, 1),
        "median_s": {k: round(v, 3) for k, v in medians.items()},
    }
    sha = medians["read + CRC-32 + SHA-256"] - medians["read + CRC-32"]
    share = 100 * sha / medians["load"]
    lines = [
        f"# Package integrity cost ({result['date']})",
        "",
        f"`{command}` on {result['machine']}: a {size_mb:.0f} MB package, median of "
        f"{args.rounds} rounds.",
        "",
        "| step | seconds |",
        "|---|---|",
        *(f"| {k} | {v:.3f} |" for k, v in medians.items()),
        "",
        f"SHA-256 of every member: {sha:.3f} s on top of reading it ({share:.0f}% of a load); "
        f"recording the digests at save: {medians['digest at save']:.3f} s "
        f"({100 * medians['digest at save'] / medians['save']:.0f}% of a save).",
    ]
    write("package_integrity", result, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

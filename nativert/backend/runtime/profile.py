"""What `Executor.profile` returns: the median time per node and delegate call."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class ProfileRow:
    node: str
    target: str
    delegate: str | None
    median_us: float


class ProfileTable(list):
    def __str__(self) -> str:
        total = sum(r.median_us for r in self) or 1.0
        lines = [f"{'node':<40} {'target':<44} {'median us':>10} {'share':>7}"]
        for r in sorted(self, key=lambda r: -r.median_us):
            target = r.target if r.delegate is None else f"delegate {r.delegate!r}"
            lines.append(
                f"{r.node:<40} {target:<44} {r.median_us:>10.1f} {100 * r.median_us / total:>6.1f}%"
            )
        return "\n".join(lines)

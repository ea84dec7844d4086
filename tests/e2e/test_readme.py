"""Every ```python block in README.md runs, in order, in one namespace: the manual cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(python_blocks()) >= 5


def test_readme_python_blocks_run():
    namespace: dict = {"__name__": "readme"}
    for index, block in enumerate(python_blocks()):
        code = compile(block, f"README.md python block {index}", "exec")
        exec(code, namespace)  # noqa: S102 - running our own documentation is the point

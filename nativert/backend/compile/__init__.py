"""The torch.compile backend: backend.py (the entry point and aot compilers), aot.py (aot
graphs as programs), report.py (what each compile did)."""

from nativert.backend.compile.backend import nativert_backend
from nativert.backend.compile.report import (
    CompileReport,
    GraphCompile,
    compile_reports,
    last_compile_report,
)

__all__ = [
    "CompileReport",
    "GraphCompile",
    "compile_reports",
    "last_compile_report",
    "nativert_backend",
]

"""The compiler pass suite: one file per pass, and the default pipeline as an ordered list."""

from nativert.passes.decompose_to_core_aten import decompose_to_core_aten
from nativert.passes.pass_result import PassResult

__all__ = ["PassResult", "decompose_to_core_aten"]

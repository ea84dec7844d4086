"""The compiler pass suite: one file per pass, pipelines as explicit ordered lists.

`DEFAULT_PIPELINE` keeps training working (gradients still reach every parameter) and is what
`to_backend` runs after decomposition. `INFERENCE_PIPELINE` adds the folding passes, which
turn weights into precomputed constants.
"""

from nativert.passes.canonicalize_views import canonicalize_views
from nativert.passes.decompose_to_core_aten import decompose_to_core_aten
from nativert.passes.derived_weights import DerivedWeight, derived_weights, refold_weights
from nativert.passes.eliminate_common_subexpressions import eliminate_common_subexpressions
from nativert.passes.eliminate_dead_code import eliminate_dead_code
from nativert.passes.fold_constants import fold_constants
from nativert.passes.fuse_conv_batchnorm import fuse_conv_batchnorm
from nativert.passes.manager import (
    PassError,
    PassRecord,
    PipelineResult,
    pass_name,
    run_passes,
)
from nativert.passes.pass_result import PassResult
from nativert.passes.remove_noop_ops import remove_noop_ops

DEFAULT_PIPELINE = (
    ("remove_noop_ops", remove_noop_ops),
    ("canonicalize_views", canonicalize_views),
    ("eliminate_common_subexpressions", eliminate_common_subexpressions),
    ("eliminate_dead_code", eliminate_dead_code),
)

INFERENCE_PIPELINE = (
    *DEFAULT_PIPELINE,
    ("fuse_conv_batchnorm", fuse_conv_batchnorm),
    ("fold_constants", fold_constants),
    ("eliminate_dead_code", eliminate_dead_code),
)

__all__ = [
    "DEFAULT_PIPELINE",
    "INFERENCE_PIPELINE",
    "DerivedWeight",
    "PassError",
    "PassRecord",
    "PassResult",
    "PipelineResult",
    "canonicalize_views",
    "decompose_to_core_aten",
    "derived_weights",
    "eliminate_common_subexpressions",
    "eliminate_dead_code",
    "fold_constants",
    "fuse_conv_batchnorm",
    "pass_name",
    "refold_weights",
    "remove_noop_ops",
    "run_passes",
]

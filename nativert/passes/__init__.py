"""The compiler pass suite: one file per pass, pipelines as explicit ordered lists
(`pipelines.py`), run by the pass manager (`manager.py`)."""

from nativert.passes.canonicalize_views import canonicalize_views
from nativert.passes.decompose_to_core_aten import (
    decompose_to_core_aten,
    decomposition_table,
    keeping_composite_ops_whole,
)
from nativert.passes.derived_weights import DerivedWeight, derived_weights, refold_weights
from nativert.passes.eliminate_common_subexpressions import eliminate_common_subexpressions
from nativert.passes.eliminate_dead_code import eliminate_dead_code
from nativert.passes.fold_constants import fold_constants
from nativert.passes.fuse_conv_batchnorm import fuse_conv_batchnorm
from nativert.passes.lower_precision import lower_precision
from nativert.passes.manager import (
    PassError,
    PassRecord,
    PipelineResult,
    pass_name,
    run_passes,
)
from nativert.passes.pass_result import PassResult
from nativert.passes.pin_output_views_of_inputs import pin_output_views_of_inputs
from nativert.passes.pipelines import (
    COMPILE_AFTER_LOWERING,
    COMPILE_PIPELINE,
    DEFAULT_PIPELINE,
    INFERENCE_PIPELINE,
)
from nativert.passes.relax_views import relax_views
from nativert.passes.remove_noop_ops import remove_noop_ops

__all__ = [
    "COMPILE_AFTER_LOWERING",
    "COMPILE_PIPELINE",
    "DEFAULT_PIPELINE",
    "INFERENCE_PIPELINE",
    "DerivedWeight",
    "PassError",
    "PassRecord",
    "PassResult",
    "PipelineResult",
    "canonicalize_views",
    "decompose_to_core_aten",
    "decomposition_table",
    "derived_weights",
    "eliminate_common_subexpressions",
    "eliminate_dead_code",
    "fold_constants",
    "fuse_conv_batchnorm",
    "keeping_composite_ops_whole",
    "lower_precision",
    "pass_name",
    "pin_output_views_of_inputs",
    "refold_weights",
    "relax_views",
    "remove_noop_ops",
    "run_passes",
]

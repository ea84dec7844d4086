"""The pass pipelines: explicit ordered lists of (name, pass).

DEFAULT_PIPELINE keeps training working (gradients still reach every parameter) and is what
`to_backend` runs after decomposition. INFERENCE_PIPELINE adds the folding passes, which turn
weights into precomputed constants. The torch.compile backend runs COMPILE_PIPELINE before
partitioning and COMPILE_AFTER_LOWERING on the lowered graph (what aot_autograd's graphs need).
"""

from nativert.passes.canonicalize_views import canonicalize_views
from nativert.passes.eliminate_common_subexpressions import eliminate_common_subexpressions
from nativert.passes.eliminate_dead_code import eliminate_dead_code
from nativert.passes.fold_constants import fold_constants
from nativert.passes.fuse_conv_batchnorm import fuse_conv_batchnorm
from nativert.passes.pin_output_views_of_inputs import pin_output_views_of_inputs
from nativert.passes.relax_views import relax_views
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

COMPILE_PIPELINE = (
    *DEFAULT_PIPELINE,
    ("pin_output_views_of_inputs", pin_output_views_of_inputs),
)

COMPILE_AFTER_LOWERING = (("relax_views", relax_views),)

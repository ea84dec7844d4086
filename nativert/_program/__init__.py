"""Helpers over ExportedProgram graphs and signatures, shared by every layer.

signature: weights, placeholders and arguments; build: programs over rewritten graphs;
gradients: which outputs take no gradient; tensors: weight checks and output aliasing;
meta: the node.meta keys nativert uses.
"""

from nativert._program.build import (
    copy_graph_module,
    program_from_graph,
    rebuild_program,
    remember_input_names,
)
from nativert._program.gradients import find_nondifferentiable_outputs
from nativert._program.meta import ARG_NAME_KEY
from nativert._program.signature import (
    WEIGHT_KINDS,
    argument,
    finite_int,
    placeholder_values,
    weight_names,
    weight_tensor,
)
from nativert._program.tensors import unalias_outputs, validate_weights

__all__ = [
    "ARG_NAME_KEY",
    "WEIGHT_KINDS",
    "argument",
    "copy_graph_module",
    "find_nondifferentiable_outputs",
    "finite_int",
    "placeholder_values",
    "program_from_graph",
    "rebuild_program",
    "remember_input_names",
    "unalias_outputs",
    "validate_weights",
    "weight_names",
    "weight_tensor",
]

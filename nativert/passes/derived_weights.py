"""Weights computed from other weights by folding passes, and how to compute them again.

`fold_constants` and `fuse_conv_batchnorm` replace subgraphs of weights by precomputed
tensors. Users may later update the original weights (by their original names), so each
folded tensor records a recipe: which source weights it came from and a small graph that
computes it. `refold_weights` re-runs the recipes touched by an update.

Recipes live in the program's graph module meta (they follow the program through passes
and lowering; a later `run_decompositions` by the user drops them). The source tensors are
kept with the recipes: that is the memory cost of updatable folding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument
from torch.fx import GraphModule, Node

from nativert._program import WEIGHT_KINDS, rebuild_program
from nativert.errors import WeightsError

RECIPES_KEY = "nativert_derived_weights"
SOURCES_KEY = "nativert_weight_sources"


@dataclasses.dataclass(frozen=True)
class DerivedWeight:
    """`target` (a program constant) == compute(*sources)."""

    target: str
    sources: tuple[str, ...]
    compute: GraphModule


def derived_weights(program: ExportedProgram) -> dict[str, DerivedWeight]:
    return dict(program.graph_module.meta.get(RECIPES_KEY, {}))


def weight_sources(program: ExportedProgram) -> dict[str, torch.Tensor]:
    return dict(program.graph_module.meta.get(SOURCES_KEY, {}))


def record(gm: GraphModule, recipe: DerivedWeight, sources: Mapping[str, torch.Tensor]) -> None:
    """Attach a recipe and its source tensors to a graph module (used by folding passes)."""
    gm.meta.setdefault(RECIPES_KEY, {})[recipe.target] = recipe
    store = gm.meta.setdefault(SOURCES_KEY, {})
    for name in recipe.sources:
        store.setdefault(name, sources[name])


def refold_weights(
    program: ExportedProgram, updates: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """New values of every derived weight that depends on a weight in `updates`.

    Sources not in `updates` keep their recorded values. Raises WeightsError naming the
    weight when an update does not match the recorded source's shape or dtype.
    """
    recipes = derived_weights(program)
    sources = weight_sources(program)
    for name, tensor in updates.items():
        if name not in sources:
            continue
        old = sources[name]
        if tensor.shape != old.shape or tensor.dtype != old.dtype:
            raise WeightsError(
                f"weight {name!r}: got shape {tuple(tensor.shape)} {tensor.dtype}, expected "
                f"{tuple(old.shape)} {old.dtype} (it feeds folded weights)"
            )
    merged = {**sources, **updates}
    with torch.no_grad():
        return {
            recipe.target: recipe.compute(*(merged[s] for s in recipe.sources))
            for recipe in recipes.values()
            if any(s in updates for s in recipe.sources)
        }


class ConstantInstaller:
    """Adds folded constants to a graph being rewritten, and the specs to rebuild it with."""

    def __init__(self, program: ExportedProgram, gm: GraphModule) -> None:
        self.program = program
        self.gm = gm
        self.new_inputs: dict[str, InputSpec] = {}
        self.new_weights: dict[str, torch.Tensor] = {}
        self._kinds = {spec.arg.name: spec.kind for spec in program.graph_signature.input_specs}
        vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
        self._fake_mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
        taken = set(program.state_dict) | set(program.constants)
        self._taken = taken

    def weight_target(self, node: Node) -> str | None:
        """The weight a placeholder holds, if it is an unmutated parameter/buffer/constant."""
        if node.op != "placeholder" or self._kinds.get(node.name) not in WEIGHT_KINDS:
            return None
        sig = self.program.graph_signature
        spec = next(s for s in sig.input_specs if s.arg.name == node.name)
        if spec.target in sig.buffers_to_mutate.values():
            return None
        return spec.target

    def add(self, base: str, value: torch.Tensor) -> Node:
        """A new constant placeholder (before the user inputs) holding `value`."""
        target, i = base, 0
        while target in self._taken:
            i += 1
            target = f"{base}_{i}"
        self._taken.add(target)
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        anchor = next(
            (n for n in placeholders if self._kinds.get(n.name) == InputKind.USER_INPUT),
            next(n for n in self.gm.graph.nodes if n.op != "placeholder"),
        )
        with self.gm.graph.inserting_before(anchor):
            node = self.gm.graph.placeholder(f"c_{target}")
        if self._fake_mode is not None:
            node.meta["val"] = self._fake_mode.from_tensor(value, static_shapes=True)
        self._kinds[node.name] = InputKind.CONSTANT_TENSOR
        self.new_inputs[node.name] = InputSpec(
            InputKind.CONSTANT_TENSOR, TensorArgument(name=node.name), target
        )
        self.new_weights[target] = value
        return node

    def drop_unused(self, placeholders: list[Node]) -> None:
        """Erase source weight placeholders that nothing reads any more."""
        for node in placeholders:
            if node.op == "placeholder" and not node.users:
                self.gm.graph.erase_node(node)

    def rebuild(self) -> ExportedProgram:
        self.gm.graph.lint()
        self.gm.recompile()
        return rebuild_program(
            self.program, self.gm, new_inputs=self.new_inputs, new_weights=self.new_weights
        )

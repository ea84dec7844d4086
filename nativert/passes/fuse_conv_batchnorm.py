"""Fold an eval-mode batch norm into the convolution before it (inference only).

Problem: in inference, `conv -> batch_norm` computes a per-channel affine map after the
convolution: a second pass over the activation for what a scaled weight and a new bias give
for free.

Guarantees: only `aten.convolution` (not transposed) feeding only
`_native_batch_norm_legit_no_training`, whose normalized output is the only one used, with
every weight a constant that the program does not mutate. The conv gets new weight and bias
constants; the originals that nothing else reads leave the program and are recorded, with
how to recompute the fused tensors, for `refold_weights`. Values are unchanged up to float
rounding.
"""

from __future__ import annotations

import operator

import torch
from torch.export import ExportedProgram
from torch.fx import GraphModule, Node
from torch.fx.experimental.proxy_tensor import make_fx

from nativert._program import copy_graph_module
from nativert.passes.derived_weights import ConstantInstaller, DerivedWeight, record
from nativert.passes.pass_result import PassResult

aten = torch.ops.aten


def _fused_weight(eps: float, rank: int, has_bn_weight: bool):
    def compute(weight, running_var, *bn_weight):
        scale = torch.rsqrt(running_var + eps)
        if has_bn_weight:
            scale = scale * bn_weight[0]
        return weight * scale.reshape(-1, *([1] * (rank - 1)))

    return compute


def _fused_bias(eps: float, has_conv_bias: bool, has_bn_weight: bool, has_bn_bias: bool):
    def compute(running_mean, running_var, *rest):
        rest = list(rest)
        conv_bias = rest.pop(0) if has_conv_bias else torch.zeros_like(running_mean)
        scale = torch.rsqrt(running_var + eps)
        if has_bn_weight:
            scale = scale * rest.pop(0)
        shift = rest.pop(0) if has_bn_bias else torch.zeros_like(running_mean)
        return (conv_bias - running_mean) * scale + shift

    return compute


def _match(node: Node, installer: ConstantInstaller) -> dict | None:
    if node.target is not aten._native_batch_norm_legit_no_training.default:
        return None
    conv, bn_weight, bn_bias, mean, var, _momentum, eps = node.args
    if not (isinstance(conv, Node) and conv.target is aten.convolution.default):
        return None
    if len(conv.users) != 1 or conv.args[6]:  # shared conv output, or transposed
        return None
    outs = list(node.users)
    if not all(u.target is operator.getitem for u in outs):
        return None
    if any(u.args[1] != 0 and u.users for u in outs):
        return None
    weight, conv_bias = conv.args[1], conv.args[2]
    named = {
        "weight": weight,
        "conv_bias": conv_bias,
        "bn_weight": bn_weight,
        "bn_bias": bn_bias,
        "mean": mean,
        "var": var,
    }
    targets = {}
    for key, arg in named.items():
        if arg is None and key in ("conv_bias", "bn_weight", "bn_bias"):
            continue
        target = installer.weight_target(arg) if isinstance(arg, Node) else None
        if target is None:
            return None
        targets[key] = (arg, target)
    return {"conv": conv, "bn": node, "eps": float(eps), "targets": targets}


def _recipe(compute, sources: list[tuple[Node, str]], target: str, weights) -> DerivedWeight:
    tensors = [weights[name] for _, name in sources]
    graph = make_fx(compute)(*tensors)
    return DerivedWeight(target, tuple(name for _, name in sources), graph)


def fuse_conv_batchnorm(program: ExportedProgram) -> PassResult:
    gm: GraphModule = copy_graph_module(program)
    installer = ConstantInstaller(program, gm)
    weights = {**program.state_dict, **program.constants}
    matches = [m for n in gm.graph.nodes if (m := _match(n, installer)) is not None]
    for m in matches:
        conv, bn, eps, t = m["conv"], m["bn"], m["eps"], m["targets"]
        rank = weights[t["weight"][1]].dim()
        w_sources = [t["weight"], t["var"]] + ([t["bn_weight"]] if "bn_weight" in t else [])
        b_sources = [t["mean"], t["var"]] + [
            t[k] for k in ("conv_bias", "bn_weight", "bn_bias") if k in t
        ]
        base = t["weight"][1].replace(".", "_")
        w_recipe = _recipe(
            _fused_weight(eps, rank, "bn_weight" in t), w_sources, f"{base}_fused_bn", weights
        )
        b_recipe = _recipe(
            _fused_bias(eps, "conv_bias" in t, "bn_weight" in t, "bn_bias" in t),
            b_sources,
            f"{base}_fused_bn_bias",
            weights,
        )
        with torch.no_grad():
            w_value = w_recipe.compute(*(weights[s] for s in w_recipe.sources))
            b_value = b_recipe.compute(*(weights[s] for s in b_recipe.sources))
        w_node = installer.add(w_recipe.target, w_value)
        b_node = installer.add(b_recipe.target, b_value)
        for recipe, node in ((w_recipe, w_node), (b_recipe, b_node)):
            recipe = DerivedWeight(
                installer.new_inputs[node.name].target, recipe.sources, recipe.compute
            )
            record(gm, recipe, weights)
        with gm.graph.inserting_after(bn):
            fused = gm.graph.call_function(
                aten.convolution.default, (conv.args[0], w_node, b_node, *conv.args[3:])
            )
        fused.meta = dict(conv.meta)
        out = next(u for u in bn.users if u.args[1] == 0)
        out.replace_all_uses_with(fused)
        for user in list(bn.users):
            gm.graph.erase_node(user)
        gm.graph.erase_node(bn)
        gm.graph.erase_node(conv)
        installer.drop_unused([node for node, _ in t.values()])
    if not matches:
        return PassResult(program, modified=False)
    return PassResult(installer.rebuild(), modified=True)

"""flatten: the step's modules called as functions, every parameter read by one flat name;
the last pass.

At small batch the host issuing the decode step's nodes bounds it, and a module call is the
dearest node: fx code reaches a layer's module through the module tree
(`getattr(self.layers, "3").self_attn.k_proj(x)`, three nn.Module.__getattr__ lookups), then
nn.Module.__call__ runs its hook checks before `forward` calls the functional. This pass
turns each call of an nn.Linear, nn.LayerNorm or nn.Embedding into that functional
(`F.linear(x, w, b)`, the very call their `forward` makes, so the numbers are the same)
reading its parameters through flat aliases on the root (`kvc_layers_3_self_attn_k_proj_weight`).
Other modules (a model's own, e.g. OPT's positional embedding) stay module calls, by a flat
alias of the module. The node keeps its name and meta; only its op, target and arguments
change. kvc.profiler.host_us measures a module call and an aten op apart. A consequence: hooks
registered on those modules do not run inside a compiled step (nothing in kvc uses them).

Nothing is copied: an alias is a plain instance attribute holding the very module or
parameter, so the weight streamer's `.data` swaps and the module tree (`layers.3`, which the
runtime reads; named_parameters and state_dict list each tensor once) see the same tensors.
Buffers keep their dotted names (Module.to() replaces a buffer, which would strand an
alias). The dotted name stays in node.meta["kvc"]["target"] (of the module call, or of each
parameter read) for readers that need the layer (tests' race simulator). It runs last
because the passes before it read layer numbers from dotted module targets (streams: a
weight-streamed layer's parameter readers).
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from .nodes import KvcPass, kvc_meta


def flat_name(target: str) -> str:
    return "kvc_" + target.replace(".", "_")


class Flatten(KvcPass):
    name = "flatten"
    after = ("streams",)

    def run(self, gm: torch.fx.GraphModule) -> bool:
        return flatten_targets(gm)


def flatten_targets(gm: torch.fx.GraphModule, functional: bool = True) -> bool:
    """Alias every dotted call_module / parameter get_attr target flat; with `functional`,
    call Linear / LayerNorm / Embedding modules as their functionals. kvc.profiler.host_us
    times module calls with functional=False (what a module call costs)."""
    g = gm.graph
    changed = False
    for n in list(g.nodes):
        if n.op == "call_module" and functional and _inline(gm, n):
            changed = True
            continue
        if n.op not in ("call_module", "get_attr") or "." not in n.target:
            continue
        obj = gm.get_submodule(n.target) if n.op == "call_module" else _get_attr(gm, n.target)
        if not isinstance(obj, (torch.nn.Module, torch.nn.Parameter)):
            continue  # a buffer: Module.to() replaces buffers, so an alias could go stale
        _alias(gm, n.target, obj)
        kvc_meta(n)["target"] = n.target
        n.target = flat_name(n.target)
        changed = True
    if changed:
        g.lint()
        gm.recompile()
    return changed


def _alias(gm: torch.fx.GraphModule, dotted: str, obj) -> str:
    # a plain instance attribute, not a registered submodule or parameter: found by fx's
    # `self.<name>` without nn.Module.__getattr__, and absent from the module tree
    flat = flat_name(dotted)
    object.__setattr__(gm, flat, obj)
    return flat


def _param(gm: torch.fx.GraphModule, dotted: str, p):
    """A get_attr node of the flat alias of parameter `p` (None stays None), placed after the
    graph's inputs, so it sits between no two of the step's other nodes."""
    if p is None:
        return None
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        node = gm.graph.get_attr(_alias(gm, dotted, p))
    kvc_meta(node).update(target=dotted, stream="compute")  # every node has a stream (streams pass)
    return node


def _inline(gm: torch.fx.GraphModule, n: torch.fx.Node) -> bool:
    """Turn a call of an nn.Linear / nn.LayerNorm / nn.Embedding into its functional, in place."""
    m = gm.get_submodule(n.target)
    if n.kwargs or len(n.args) != 1:
        return False
    x = n.args[0]
    if type(m) is torch.nn.Linear:
        fn, params, rest = F.linear, (m.weight, m.bias), ()
    elif type(m) is torch.nn.LayerNorm:
        fn, params, rest = F.layer_norm, (m.weight, m.bias), (m.eps,)
        x = (x, tuple(m.normalized_shape))
    elif type(m) is torch.nn.Embedding and m.max_norm is None:
        fn, params, rest = F.embedding, (m.weight,), (m.padding_idx, None, m.norm_type,
                                                      m.scale_grad_by_freq, m.sparse)
    else:
        return False
    names = ("weight", "bias")
    nodes = tuple(_param(gm, f"{n.target}.{k}", p) for k, p in zip(names, params))
    kvc_meta(n)["target"] = n.target
    n.op, n.target = "call_function", fn
    n.args = (*x, *nodes, *rest) if isinstance(x, tuple) else (x, *nodes, *rest)
    return True


def _get_attr(gm: torch.fx.GraphModule, target: str):
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner), attr)

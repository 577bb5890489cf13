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
    after = ("streams", "handoff")

    def run(self, gm: torch.fx.GraphModule) -> bool:
        return flatten_targets(gm)


def flatten_targets(gm: torch.fx.GraphModule, functional: bool = True) -> bool:
    """Alias every dotted call_module / parameter get_attr target flat; with `functional`,
    call Linear / LayerNorm / Embedding modules as their functionals. kvc.profiler.host_us
    times module calls with functional=False (what a module call costs)."""
    reads = _ParamReads(gm)
    changed = False
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and functional and _inline(gm, n, reads):
            changed = True
            continue
        if n.op not in ("call_module", "get_attr") or "." not in n.target:
            continue
        obj = gm.get_submodule(n.target) if n.op == "call_module" else _get_attr(gm, n.target)
        if not isinstance(obj, (torch.nn.Module, torch.nn.Parameter)):
            continue  # a buffer: Module.to() replaces buffers, so an alias could go stale
        kvc_meta(n)["target"] = n.target
        n.target = _alias(gm, n.target, obj)
        changed = True
    if changed:
        gm.recompile()
    return changed


def _alias(gm: torch.fx.GraphModule, dotted: str, obj) -> str:
    # a plain instance attribute, not a registered submodule or parameter: found by fx's
    # `self.<name>` without nn.Module.__getattr__, and absent from the module tree
    flat = flat_name(dotted)
    object.__setattr__(gm, flat, obj)
    return flat


class _ParamReads:
    """One get_attr node per parameter read by inlined calls (a layer's K/V projections are
    called again by every recompute clone and micro-batch), placed after the graph's inputs
    so that it sits between no two of the step's other nodes."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm, self.nodes = gm, {}
        self.first = next(n for n in gm.graph.nodes if n.op != "placeholder")

    def __call__(self, dotted: str, p):
        if p is None:
            return None
        if dotted not in self.nodes:
            with self.gm.graph.inserting_before(self.first):
                node = self.gm.graph.get_attr(_alias(self.gm, dotted, p))
            kvc_meta(node).update(target=dotted, stream="compute")  # every node has a stream
            self.nodes[dotted] = node
        return self.nodes[dotted]


def _inline(gm: torch.fx.GraphModule, n: torch.fx.Node, reads: _ParamReads) -> bool:
    """Turn a call of an nn.Linear / nn.LayerNorm / nn.Embedding into its functional, in place:
    fn(*lead, weight, bias, *rest), as the module's forward calls it."""
    m = gm.get_submodule(n.target)
    if n.kwargs or len(n.args) != 1:
        return False
    x = n.args[0]
    if type(m) is torch.nn.Linear:
        fn, lead, params, rest = F.linear, (x,), (m.weight, m.bias), ()
    elif type(m) is torch.nn.LayerNorm:
        fn, lead, params, rest = F.layer_norm, (x, tuple(m.normalized_shape)), (m.weight, m.bias), (m.eps,)
    elif type(m) is torch.nn.Embedding and m.max_norm is None:
        fn, lead, params, rest = F.embedding, (x,), (m.weight,), (m.padding_idx, None, m.norm_type,
                                                                  m.scale_grad_by_freq, m.sparse)
    else:
        return False
    nodes = tuple(reads(f"{n.target}.{k}", p) for k, p in zip(("weight", "bias"), params))
    kvc_meta(n)["target"] = n.target
    n.op, n.target = "call_function", fn
    n.args = (*lead, *nodes, *rest)
    return True


def _get_attr(gm: torch.fx.GraphModule, target: str):
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner), attr)

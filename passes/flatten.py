"""flatten: every submodule call and attribute read by one flat name; the last pass.

fx code reaches a layer's module through the module tree on every call:
`getattr(self.layers, "3").self_attn.k_proj(x)` is three nn.Module.__getattr__ lookups before
the call itself, a quarter of a module node's host time (kvc.profiler.host_us measures both).
At small batch the host issuing nodes bounds the decode step, so this pass registers each
dotted `call_module` / `get_attr` target once more under a flat name on the root
(`kvc_layers_3_self_attn_k_proj`), the same object, and points the node at it.

Nothing is copied: an alias is the very module or parameter, so the weight streamer's
`.data` swaps and the module tree (`layers.3`, which the runtime reads) see the same tensors.
Buffers keep their dotted names (Module.to() replaces a buffer, which would strand an alias). The dotted name stays in node.meta["kvc"]["target"] for readers that need the
layer (tests' race simulator). It runs last because the passes before it read layer numbers
from dotted targets (streams: a weight-streamed layer's parameter readers).
"""
from __future__ import annotations

import torch.fx

from .nodes import KvcPass, kvc_meta


def flat_name(target: str) -> str:
    return "kvc_" + target.replace(".", "_")


class Flatten(KvcPass):
    name = "flatten"
    after = ("streams",)

    def run(self, gm: torch.fx.GraphModule) -> bool:
        return flatten_targets(gm)


def flatten_targets(gm: torch.fx.GraphModule) -> bool:
    """Point every dotted call_module / get_attr node (modules and parameters) at a flat alias
    of the same object; kvc.profiler.host_us times module calls the same way."""
    changed = False
    for n in gm.graph.nodes:
        if n.op not in ("call_module", "get_attr") or "." not in n.target:
            continue
        obj = gm.get_submodule(n.target) if n.op == "call_module" else _get_attr(gm, n.target)
        if not isinstance(obj, (torch.nn.Module, torch.nn.Parameter)):
            continue  # a buffer: Module.to() replaces buffers, so an alias could go stale
        # a plain instance attribute, not a registered submodule or parameter: found by fx's
        # `self.<name>` without nn.Module.__getattr__, and absent from the module tree
        # (named_parameters, state_dict and .to() see every tensor once, by its own name)
        flat = flat_name(n.target)
        object.__setattr__(gm, flat, obj)
        kvc_meta(n)["target"] = n.target
        n.target = flat
        changed = True
    if changed:
        gm.recompile()
    return changed


def _get_attr(gm: torch.fx.GraphModule, target: str):
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner), attr)

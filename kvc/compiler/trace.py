"""Symbolic trace of a decoder's prefill and decode step into torch.fx GraphModules.

The models follow one forward contract (kvc.models): `forward(input_ids, positions, rt,
prefill, last_only)`, with the cache read and write as explicit `torch.ops.kvc` nodes. The two
phases differ only by the concrete `prefill` / `last_only` flags.
"""
from __future__ import annotations

import torch
import torch.fx

import kvc.ir.ops  # noqa: F401  (registers torch.ops.kvc before tracing)


class _Tracer(torch.fx.Tracer):
    # buffers become get_attr nodes rather than constants fx stores on the model under a
    # counter that grows with every trace: the generated code (and its hash) stays the same
    proxy_buffer_attributes = True


def trace_step(model: torch.nn.Module, prefill: bool) -> torch.fx.GraphModule:
    """Prefill returns the last position's logits; the decode step returns [b, 1, vocab]."""
    flags = {"prefill": prefill, "last_only": prefill}
    tracer = _Tracer()
    gm = torch.fx.GraphModule(tracer.root if hasattr(tracer, "root") else model,
                              tracer.trace(model, concrete_args=flags), type(model).__name__)
    _drop_flag_inputs(gm, flags)
    gm.meta["kvc"] = {"phase": "prefill" if prefill else "decode", "passes": []}
    return gm


def _drop_flag_inputs(gm: torch.fx.GraphModule, flags: dict) -> None:
    """The concrete flags leave placeholders and `_assert` guards behind; a graph made for one
    phase needs neither: its signature becomes forward(input_ids, positions, rt)."""
    g = gm.graph
    for n in reversed(list(g.nodes)):
        if n.op == "call_function" and n.target is torch._assert:
            g.erase_node(n)
    g.eliminate_dead_code(is_impure_node=lambda n: n.op != "call_function" or n.is_impure())
    for n in list(g.nodes):
        if n.op == "placeholder":
            if any(n.target.startswith(f) for f in flags) and not n.users:
                g.erase_node(n)
            else:
                n.type = None  # "rt : int" rather than fx's internal type repr
    gm.recompile()

"""What every pass shares: the pass base class and the Plan questions passes ask.

- `KvcPass` subclasses declare `name` (and `after`); a second run is a no-op, so every pass
  is idempotent, and `gm.meta["kvc"]["passes"]` lists what ran, in order.
- Reading nodes (which kvc op, its arguments, which layer made it) is kvc.ir.graph's job;
  the names are re-exported here so that a pass imports what it needs from one place.
"""
from __future__ import annotations

import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from kvc.ir.graph import (  # noqa: F401  (the passes' vocabulary, defined in kvc.ir.graph)
    call,
    first_compute_node,
    is_op,
    kvc_meta,
    layer_nodes,
    layer_of,
    module_layer,
    op_arg,
    op_arg_names,
    op_name,
    placeholder,
    readers,
    set_op_arg,
)
from kvc.ir.plan import Plan


def may_recompute(plan: Plan, layer: int) -> bool:
    """Whether any context of the plan recomputes tokens of this layer (unit)."""
    if plan.resident[layer]:
        return False
    if plan.forced_fraction is not None:
        return plan.forced_fraction > 0
    return any(row[layer] > 0 for row in plan.recompute)


def offloaded_layers(plan: Plan) -> tuple[int, ...]:
    """The offloaded units, in order (layers when the plan has one micro-batch)."""
    return plan.offloaded_units


class KvcPass(PassBase):
    """A pass over a kvc GraphModule: runs once, records itself in gm.meta["kvc"]["passes"]."""

    name = "pass"
    after: tuple[str, ...] = ()
    # a pass called on its own recompiles gm (its code then says what the graph does); the
    # pipeline's PassManager recompiles after every pass itself, and twice was 46% of lower()
    recompiles = True

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        state = gm.meta.setdefault("kvc", {"passes": []})
        done = state.setdefault("passes", [])
        if self.name in done:
            return PassResult(gm, False)  # idempotent: a second run changes nothing
        missing = [r for r in self.after if r not in done]
        if missing:
            raise RuntimeError(f"pass {self.name!r} needs {missing} to run first")
        modified = self.run(gm)
        done.append(self.name)
        gm.graph.lint()
        if self.recompiles:
            gm.recompile()
        return PassResult(gm, modified)

    def run(self, gm: torch.fx.GraphModule) -> bool:
        raise NotImplementedError


class PlanPass(KvcPass):
    """A pass that rewrites the graph as the Plan says."""

    def __init__(self, plan: Plan):
        super().__init__()
        self.plan = plan


def graph_parts(gm: torch.fx.GraphModule):
    """(graph, nodes by name, the `rt` input): what every rewriting pass starts from."""
    return gm.graph, {n.name: n for n in gm.graph.nodes}, placeholder(gm, "rt")

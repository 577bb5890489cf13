"""The pass pipeline, in its one fixed order. Each pass reads what the earlier ones recorded
in node.meta["kvc"] / gm.meta["kvc"] and refuses to run before them (see README.md)."""
from __future__ import annotations

import torch.fx
from torch.fx.passes.infra.pass_manager import PassManager

from kvc.ir.plan import Plan

from .annotate import Annotate
from .flatten import Flatten
from .handoff import Handoff
from .microbatch import MicroBatch
from .offload import Offload
from .prefetch import Prefetch
from .recompute import Recompute
from .streams import Streams
from .weights import Weights

ORDER = ("microbatch", "annotate", "offload", "recompute", "prefetch", "weights", "streams", "handoff",
         "flatten")


def build_passes(plan: Plan) -> list:
    passes = [MicroBatch(plan), Annotate(), Offload(plan), Recompute(plan), Prefetch(plan), Weights(plan),
              Streams(plan), Handoff(plan), Flatten()]
    assert tuple(p.name for p in passes) == ORDER
    return passes


def run_pipeline(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    passes = build_passes(plan)
    for p in passes:  # the PassManager recompiles after each pass
        p.recompiles = False
    try:
        result = PassManager(passes=passes)(gm)
    except Exception as e:
        # PassManager wraps a pass's error in a bare Exception naming the pass: keep the cause
        # (e.g. annotate's "K,V cannot be recomputed") as the error callers see
        if e.__cause__ is not None and type(e) is Exception:
            raise e.__cause__ from e
        raise
    return result.graph_module

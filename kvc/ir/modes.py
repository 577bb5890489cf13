"""The schedules kvc offers, in one table: what each one lets the planner decide and how the
runtime overlaps its copies. Code asks a Mode what it does; it never branches on its name.

Adding a mode: a row here (its conf/schedule/<name>.yaml if it needs other defaults), and a
test that its plan runs and matches the reference decoder (tests/test_compiled_parity.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from kvc.errors import KvcError


@dataclass(frozen=True)
class Mode:
    name: str
    offloads: bool  # the KV cache lives in CPU memory (False: everything on the GPU)
    recomputes: bool  # the LP may recompute K,V from shipped activations
    keeps_resident: bool  # the LP may keep whole layers' caches on the GPU under the budget
    lookahead: int  # layers prefetched ahead: 1 double-buffers; 0 runs layer by layer (paper)
    chunked: bool  # the activation copy is split into chunks, each recomputed as it lands
    summary: str

    def overlap(self, act_chunks: int) -> dict:
        """Plan.lookahead and Plan.act_chunks for this mode."""
        return {"lookahead": self.lookahead, "act_chunks": act_chunks if self.chunked else 1}


_TABLE = (
    Mode("pipelined", offloads=True, recomputes=True, keeps_resident=True, lookahead=1,
         chunked=True, summary="activation chunks pipelined with recompute, the K,V tail behind "
                               "them, the next layer's copies under this layer's compute"),
    Mode("kvpr", offloads=True, recomputes=True, keeps_resident=False, lookahead=0,
         chunked=False, summary="the paper's schedule: per layer T_act(l) + max(T_recompute(l), "
                                "T_kv(s - l))"),
    Mode("full_offload", offloads=True, recomputes=False, keeps_resident=False, lookahead=1,
         chunked=False, summary="all K,V copied, the next layer prefetched (FlexGen-style)"),
    Mode("gpu_resident", offloads=False, recomputes=False, keeps_resident=False, lookahead=1,
         chunked=False, summary="no offload: the upper bound when everything fits"),
)
MODES: dict[str, Mode] = {m.name: m for m in _TABLE}
NAMES = tuple(MODES)


def mode(name: str) -> Mode:
    try:
        return MODES[name]
    except (KeyError, TypeError):
        raise KvcError(f"schedule.mode = {name!r}; expected one of {list(NAMES)}") from None

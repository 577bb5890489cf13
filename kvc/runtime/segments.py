"""CUDA graph segments: the modules the CUDA-graph partition (passes/cudagraphs.py) wraps each
static run of the decode step in.

A `Segment` runs eagerly the first time it sees its input shapes (warm-up), captures a CUDA
graph the second time and replays it from then on; without capture (a CPU) it always runs
eagerly. The graph reads fixed addresses: an input produced by another segment's replay is
that segment's fixed output already; any other input (the step's tokens and positions,
attention's output) is copied into the segment's own input buffer first (one small copy). A
segment's outputs are its fixed buffers, overwritten at the next step, so an output that
leaves the step (the logits) or that another stream reads asynchronously (`offload_act` /
`offload_kv` on the write-back stream) is cloned on the compute stream first (`escapes`).
All segments of a step share one memory pool (`SegmentSet`), and replay in the order they
were captured.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from kvc.ir.graph import segment_host_kinds


class SegmentSet:
    """What the segments of one decode graph share: the CUDA graph memory pool, and which
    tensors are some segment's fixed outputs (a later segment reads those in place)."""

    def __init__(self, capture: bool):
        self.capture = capture
        self.pool = None
        self.fixed: set[int] = set()  # id() of fixed output tensors
        self.captured = 0  # CUDA graphs captured (for tests and the bench log)
        self.segments: list[Segment] = []

    def wrap(self, gm: torch.fx.GraphModule, escapes: tuple[int, ...]) -> "Segment":
        """The partition's wrapper: one more segment of this set."""
        segment = Segment(gm, escapes, self)
        self.segments.append(segment)
        return segment

    def reset(self) -> None:
        """Forget every captured graph (the runtime's pools were rebuilt, e.g. a new batch)."""
        for segment in self.segments:
            segment.reset()
        self.pool = None
        self.fixed.clear()
        self.captured = 0


@dataclass
class _Captured:
    graph: object  # torch.cuda.CUDAGraph
    inputs: list  # fixed input buffers (or another segment's fixed outputs)
    outputs: tuple


class Segment(torch.nn.Module):
    """A run of static nodes of the decode step: eager on a CPU, a CUDA graph on a GPU."""

    def __init__(self, gm: torch.fx.GraphModule, escapes: tuple[int, ...], shared: SegmentSet):
        super().__init__()
        self.gm = gm
        self.escapes = frozenset(escapes)  # output positions cloned after a replay
        self.shared = shared
        self._graphs: dict[tuple, _Captured] = {}
        self._warm: set[tuple] = set()

    @property
    def host_kinds(self) -> dict[str, int]:
        """What the host issues per call (kvc.ir.graph.segment_host_kinds)."""
        return segment_host_kinds(len(self.escapes))

    def reset(self) -> None:
        self._graphs.clear()
        self._warm.clear()

    def forward(self, *args):
        if not self.shared.capture:
            return self.gm(*args)
        key = tuple((a.shape, a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
        entry = self._graphs.get(key)
        if entry is None:
            if key not in self._warm:  # first sight of these shapes: run as traced
                self._warm.add(key)
                return self.gm(*args)
            entry = self._graphs[key] = self._capture(args)
        for buf, a in zip(entry.inputs, args):
            if buf is not a and isinstance(a, torch.Tensor):
                buf.copy_(a)
        entry.graph.replay()
        if not self.escapes:
            return entry.outputs
        return tuple(o.clone() if i in self.escapes else o for i, o in enumerate(entry.outputs))

    def _capture(self, args) -> _Captured:
        shared = self.shared
        if shared.pool is None:
            shared.pool = torch.cuda.graph_pool_handle()
        inputs = [a if not isinstance(a, torch.Tensor) or id(a) in shared.fixed else a.clone()
                  for a in args]
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            graph.capture_begin(pool=shared.pool, capture_error_mode="thread_local")
            try:
                outputs = tuple(self.gm(*inputs))
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        shared.fixed.update(id(o) for o in outputs)
        shared.captured += 1
        return _Captured(graph, inputs, outputs)

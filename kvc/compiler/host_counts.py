"""What the host issues per decode step, by node kind, read off the lowered graph of a model.

The host issues the lowered decode step one node at a time, so the planner's host lane needs
how many nodes of each kind (kvc.ir.graph.HOST_KINDS) a plan's step has. That count is
affine in the plan's structure: a row of counts per feature, times how often the feature
occurs (`features`):

- layer: every unit (a layer on one micro-batch); head: once per step;
- offload: an offloaded unit's write-back, prefetch and event nodes;
- recompute / chunk: a recomputing unit's fixed nodes, and per activation chunk its cloned
  K/V subgraph, staged_act, put_recomputed and wait;
- weights: a weight-streamed layer's prefetch_weights and its record/wait pairs;
- split / per_micro_batch / shared_per_layer: with micro-batches, the batch split and the
  final concatenation once, an embedding, head and batch slice per extra micro-batch, and
  nodes that read no tokens (RoPE table slices) once per layer, not per unit.

`host_rows` finds the rows by lowering a 1- and 2-layer version of the model (on the meta
device) under a few probe plans, one per row, and solving the probes' counts for them,
once per model structure (cached). `graphed`: the step as piecewise CUDA graphs
(kvc.passes.cudagraphs.partition, counted without a wrapper: a segment call is one "graph"
node and a clone per value that escapes it).
"""
from __future__ import annotations

import functools
import json
from dataclasses import replace

import numpy as np

from kvc.compiler.trace import trace_step
from kvc.ir.graph import HOST_KINDS, host_kinds
from kvc.ir.plan import forced_plan
from kvc.models import build_model
from kvc.models.spec import ModelSpec
from kvc.passes.cudagraphs import partition
from kvc.passes.pipeline import run_pipeline

ROWS = ("layer", "head", "offload", "recompute", "chunk", "weights", "split",
        "per_micro_batch", "shared_per_layer")

# (layers, micro-batches, mode, recompute fraction, activation chunks, a streamed layer):
# one probe per row, each adding one feature to the ones before it; the last three (with
# micro-batches) are lowered only for a plan that has micro-batches
_PROBES = ((1, 1, "gpu_resident", 0.0, 1, False), (2, 1, "gpu_resident", 0.0, 1, False),
           (1, 1, "full_offload", 0.0, 1, False), (1, 1, "pipelined", 0.5, 1, False),
           (1, 1, "pipelined", 0.5, 2, False), (1, 1, "gpu_resident", 0.0, 1, True),
           (1, 2, "gpu_resident", 0.0, 1, False), (2, 2, "gpu_resident", 0.0, 1, False),
           (1, 3, "gpu_resident", 0.0, 1, False))
_SINGLE = 6  # probes (and rows) of a plan with one micro-batch


def features(resident, recomputes, act_chunks: int, streamed=None,
             micro_batches: int = 1) -> np.ndarray:
    """How often each row of ROWS occurs in a step: `resident` and `recomputes` per unit,
    `streamed` per layer (nonzero: its weights stream)."""
    off = ~np.asarray(resident, dtype=bool)
    rec = int((np.asarray(recomputes, dtype=bool) & off).sum())
    m = micro_batches
    extra = m - 1 if m > 1 else 0  # micro-batches beyond the first
    n_streamed = 0 if streamed is None else int(np.count_nonzero(np.asarray(streamed, dtype=float)))
    return np.array([len(off), 1, int(off.sum()), rec, rec * act_chunks, n_streamed, int(m > 1),
                     extra, -extra * (len(off) // m)])


def host_rows(spec: ModelSpec, graphed: bool = False, micro_batches: bool = True) -> np.ndarray:
    """[rows, len(HOST_KINDS)]: nodes per occurrence of each row of ROWS, by kind; the rows
    of micro-batches only if `micro_batches` (else the first six)."""
    key = json.dumps({**spec.to_dict(), "num_layers": 0, "extra": {}}, sort_keys=True)
    return _rows(key, graphed, micro_batches)


@functools.lru_cache(maxsize=64)
def _rows(key: str, graphed: bool, micro_batches: bool) -> np.ndarray:
    probes = [_lowered(key, p) for p in (_PROBES if micro_batches else _PROBES[:_SINGLE])]
    design = np.array([f[:len(probes)] for f, _ in probes], dtype=float)
    counts = np.array([_counts(partition(gm) if graphed else gm) for _, gm in probes], dtype=float)
    rows = np.linalg.solve(design, counts)
    out = np.rint(rows).astype(np.int64)
    if not np.allclose(rows, out, atol=1e-6):
        raise ValueError(f"the host node counts of the probe plans fit no whole rows: {rows}")
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=64)
def _lowered(key: str, probe: tuple):
    """A probe's features and lowered decode graph, for the model `key` names."""
    n, m, mode, frac, chunks, streams = probe
    plan = forced_plan(mode, n, 8, 8, 64, frac, act_chunks=chunks, micro_batches=m)
    if streams:
        plan = replace(plan, weights_streamed=(True,) + (False,) * (n - 1))
    gm = run_pipeline(trace_step(_model(key, n), prefill=False), plan)
    recomputes = [frac > 0 and not r for r in plan.resident]
    return features(plan.resident, recomputes, plan.act_chunks, plan.weights_streamed, m), gm


@functools.lru_cache(maxsize=8)
def _model(key: str, num_layers: int):
    """The model `key` names with `num_layers` layers, on the meta device."""
    d = json.loads(key)
    spec = ModelSpec(**{**d, "window_layers": tuple(d.get("window_layers", ())),
                        "num_layers": num_layers})
    return build_model(spec, "meta", "float16")


def _counts(gm) -> list[int]:
    by_kind = host_kinds(gm)
    return [by_kind[k] for k in HOST_KINDS]

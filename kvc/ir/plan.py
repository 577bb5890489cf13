"""Plan: the split chosen per layer and per context length. Made by the scheduler, read by
the passes and the runtime, stored in the artifact manifest.

Per layer and context s (the number of cached tokens at a decode step), tokens
[0, l) are recomputed from CPU activations and tokens [l, s) are transferred as K,V, unless
the layer is resident (its whole cache lives on the GPU, growing). `l` is looked up for
exactly the context asked: a Plan refuses a context it was not solved for.

The table (issue 15): a plan covers every context 1..max_context (`context_range`), stored as
runs: `recompute_from[k]` is the first context of run k, `recompute[k]` its l per unit, up to
the next run's first context (the last run: up to max_context). Plans made before issue 15
have no `recompute_from`: `recompute[j]` is context prompt_len + j, j in 0..gen_len. In the
manifest the runs are `recompute_runs: [[first context, [l per unit]], ...]`; old manifests
(`recompute` rows) still load. `prompt_len` / `gen_len` stay the workload the predictions
(`predicted_step_ms`, one per context prompt_len..prompt_len + gen_len) are reported for.

Units (issue 6, the block schedule): with `micro_batches` m > 1 the batch is split into m
equal micro-batches, and each layer runs once per micro-batch, in block order: unit
u = layer * m + k is layer u // m on micro-batch k. Everything the cache touches (`resident`,
`recompute` rows, staging slots, pools, events) is per unit; weights stay per layer, loaded
once for all m units of their layer. With m = 1 units are layers.
"""
from __future__ import annotations

import bisect
import itertools
import json
from dataclasses import dataclass, field, fields

from kvc.ir.modes import mode as mode_of

WEIGHT_SLOTS = 2  # GPU buffers of one layer's weights: one computing, one being filled


@dataclass(frozen=True)
class Plan:
    mode: str
    num_layers: int  # decoder layers of the model
    prompt_len: int
    gen_len: int
    chunk_tokens: int
    resident: tuple[bool, ...]  # per unit: its whole cache on the GPU
    # recompute[k][u]: l for unit u in run k of the table (module docstring); without
    # recompute_from (old plans), at context s = prompt_len + k (k in 0..gen_len)
    recompute: tuple[tuple[int, ...], ...] = ()
    forced_fraction: float | None = None  # set: l = round(fraction * s), any s
    # how the runtime overlaps: prefetch this many layers ahead (0: kvpr, the paper's
    # per-layer schedule; 1: pipelined and full_offload), and split the activation copy into
    # this many chunks, each recomputed as soon as it lands (1 for kvpr)
    lookahead: int = 1
    act_chunks: int = 4
    predicted_step_ms: tuple[float, ...] = ()  # per context index j, when solved
    # what the plan was solved for: predict() refuses another batch or dtype
    batch_size: int = 0
    dtype: str = ""
    notes: dict = field(default_factory=dict)  # JSON-able: memory terms, solver status, timings
    # per layer: the fraction of its weight elements that live in a pinned CPU pool and are
    # copied into one of two GPU weight slots one layer ahead of use (issue 6): its largest
    # parameters first (`streamed_prefix`). Empty: every layer's weights resident.
    weights_streamed: tuple[float, ...] = ()
    # micro-batches per block (workload.num_gpu_batches): see "Units" above
    micro_batches: int = 1
    # on a CUDA device, replay the decode step's static runs as CUDA graphs
    # (kvc.passes.cudagraphs; schedule.cuda_graphs): the host issues a layer in a few calls
    cuda_graphs: bool = False
    # the longest context the plan serves (its pools' default size; memory was checked here);
    # 0 when made: prompt_len + gen_len (plans made before issue 15)
    max_context: int = 0
    # the first context of each run of `recompute`, increasing (empty: the old layout)
    recompute_from: tuple[int, ...] = ()
    # the CPU attention lane (issue 17): cpu[k][u], the cached tokens unit u attends to on the
    # CPU in run k of the table (the runs of `recompute`; empty: none). At context s a unit
    # that attends to cached tokens [lo, s) (lo > 0 only with a window) attends to [lo, lo+c)
    # on the CPU, recomputes [lo+c, lo+c+l) and copies [lo+c+l, s) as K,V.
    cpu: tuple[tuple[int, ...], ...] = ()
    cpu_fraction: float | None = None  # set: c = round(fraction * n) of the n cached tokens, any s
    cpu_threads: int = 0  # the lane's torch threads (0: the runtime's default)
    # the lane's rate the LP planned `cpu` with (hardware.cpu_attn_gbps; 0: not planned, a
    # forced fraction or no lane); a plan priced at a rate runs its lane under the guard
    # (kvc.runtime.lane_guard: only while the steps are faster with it)
    cpu_gbps: float = 0.0
    # bare[k][u]: l for unit u in run k without the lane, the plan the LP made before it
    # added the lane (0 where this plan's graph has no recompute nodes for u): the guard's
    # arm without the lane (kvc.runtime.lane_guard) runs it. Empty: no auto lane, or a plan
    # made before session 14 (its lane runs at every step).
    bare: tuple[tuple[int, ...], ...] = ()
    # several GPUs (issue 18): the plan of ONE of world_size ranks, each decoding batch_size
    # rows (the rank's share, ceil(whole batch / world_size)) over its own link, checked
    # against its share of the host (kvc.hardware.per_rank); predicted_step_ms includes the
    # logits all-gather after each step
    world_size: int = 1
    # how the ranks split the work: "rows" (above) or "tokens" (parallel.split): every rank
    # decodes all batch_size rows, and each offloaded unit's n cached tokens [lo, s) are cut
    # into world_size contiguous shares, e_j = lo + (n * j) // world_size; a rank attends to
    # its share [e_r, e_r+1) (the last rank also to the new token), recomputing the first
    # recompute_tokens(unit, m) of its m = e_r+1 - e_r tokens and copying the rest, then the
    # ranks all-gather each offloaded unit's (out, lse) and merge them by log-sum-exp. The
    # table, max_context, prompt_len and gen_len are then a rank's SHARE of the context
    # (`context_shares`, `share_context`); predicted_step_ms includes the merges and a token
    # broadcast per step. A resident unit is not split. Every rank's pools hold every row
    # (`pool_context`)
    split: str = "rows"

    def __post_init__(self):
        if len(self.resident) != self.num_units:
            raise ValueError(f"plan: {len(self.resident)} resident flags for {self.num_units} units "
                             f"({self.num_layers} layers x {self.micro_batches} micro-batches)")
        if not self.max_context:
            object.__setattr__(self, "max_context", self.prompt_len + self.gen_len)
        starts = self.recompute_from
        if starts:
            if len(starts) != len(self.recompute):
                raise ValueError(f"plan: {len(starts)} run starts for {len(self.recompute)} runs")
            if starts[0] < 0 or any(b <= a for a, b in itertools.pairwise(starts)) \
                    or starts[-1] > self.max_context:
                raise ValueError(f"plan: run starts must increase from 0 within max_context "
                                 f"{self.max_context}")

    @property
    def context_shares(self) -> int:
        """Into how many shares an offloaded unit's cached tokens are cut: world_size for a
        token split, else 1 (the table is indexed by a rank's share of the context)."""
        return self.world_size if self.split == "tokens" and self.world_size > 1 else 1

    def share_context(self, s: int) -> int:
        """The largest rank's share of s cached tokens, ceil(s / context_shares): the context
        the table is read at (s itself but for a token split)."""
        return -(-s // self.context_shares)

    @property
    def pool_context(self) -> int:
        """The contexts every rank's host pools hold: max_context; for a token split, whose
        max_context is a share, (max_context - 1) x world_size, at least the longest whole
        context the plan serves (its share is at most max_context - 1)."""
        n = self.context_shares
        return self.max_context if n == 1 else (self.max_context - 1) * n

    @property
    def num_units(self) -> int:
        return self.num_layers * self.micro_batches

    def unit_layer(self, unit: int) -> int:
        return unit // self.micro_batches

    def layer_units(self, layer: int) -> range:
        m = self.micro_batches
        return range(layer * m, layer * m + m)

    @property
    def offloaded(self) -> bool:
        return not all(self.resident)

    @property
    def offloaded_units(self) -> tuple[int, ...]:
        """The units whose cache lives in CPU memory, in order (layers with one micro-batch):
        the one list the passes, the runtime and the reports number staging slots by."""
        return tuple(i for i, r in enumerate(self.resident) if not r)

    def recompute_tokens(self, layer: int, s: int) -> int:
        """l for unit `layer` (a layer, when micro_batches is 1) at context s. A ValueError
        for a context outside the table (`covers`). Called per unit per decode step: a
        bisect over the run starts."""
        if self.forced_fraction is not None:
            return 0 if self.resident[layer] else min(s, max(0, round(self.forced_fraction * s)))
        if self.resident[layer] and not self.recompute:
            return 0  # a hand-made all-resident plan may carry no rows
        return 0 if self.resident[layer] else self.recompute[self._row(s)][layer]

    def cpu_tokens(self, unit: int, n: int, s: int | None = None) -> int:
        """c for `unit` at context s (default n) whose n cached tokens it attends to: how many
        of the oldest it attends to on the CPU. 0 for a resident unit or without a lane."""
        if self.resident[unit]:
            return 0
        if self.cpu_fraction is not None:
            return min(n, max(0, round(self.cpu_fraction * n)))
        if not self.cpu:
            return 0
        return min(n, self.cpu[self._row(n if s is None else s)][unit])

    def bare_tokens(self, unit: int, s: int) -> int:
        """l for `unit` at context s in a step without the lane (`bare`; 0 when resident)."""
        return 0 if self.resident[unit] else self.bare[self._row(s)][unit]

    @property
    def cpu_lane(self) -> bool:
        """Whether any unit ever attends on the CPU (the runtime then starts its lane)."""
        if self.cpu_fraction is not None:
            return self.cpu_fraction > 0 and self.offloaded
        return any(any(row) for row in self.cpu)

    def _row(self, s: int) -> int:
        """The index into `recompute` of the row for context s."""
        first, last = self.context_range
        if not (self.recompute and first <= s <= last):
            raise ValueError(f"the plan covers contexts {first}..{last} tokens, not {s}; compile "
                             "with workload.max_context (or a workload) that covers it")
        if self.recompute_from:
            return bisect.bisect_right(self.recompute_from, s) - 1
        return s - self.prompt_len

    @property
    def context_range(self) -> tuple[int, int]:
        """(first, last): the contexts the plan was made for, both included. A solved plan:
        (1, max_context); a plan made before issue 15: (prompt_len, prompt_len + gen_len) (its
        rows); a forced plan: (1, max_context), though its l answers any context."""
        if self.forced_fraction is not None:
            return 1, self.max_context
        if self.recompute_from:
            return self.recompute_from[0], self.max_context
        if self.recompute:
            return self.prompt_len, self.prompt_len + len(self.recompute) - 1
        return self.prompt_len, self.max_context

    def covers(self, s: int) -> bool:
        """Whether recompute_tokens answers context s for every unit: a forced plan and a
        hand-made all-resident plan without rows for any s >= 0, a table within
        context_range."""
        if s < 0:
            return False
        if self.forced_fraction is not None or (not self.recompute and all(self.resident)):
            return True
        first, last = self.context_range
        return bool(self.recompute) and first <= s <= last

    def _rows_between(self, lo: int, hi: int) -> tuple[tuple[int, ...], ...]:
        """The rows of the table that serve some context in [lo, hi] (clipped to the table)."""
        first, last = self.context_range
        lo, hi = max(lo, first), min(hi, last)
        if lo > hi or not self.recompute:
            return ()
        return self.recompute[self._row(lo):self._row(hi) + 1]

    def recompute_table(self, contexts, units=None) -> list[list[int]]:
        """[units][contexts]: l of each unit (`units`; None: all) at each context, every one
        covered: recompute_tokens over arrays, for the planner's evaluations."""
        ctx = [int(s) for s in contexts]
        units = range(self.num_units) if units is None else units
        if self.forced_fraction is not None or not self.recompute:
            return [[self.recompute_tokens(u, s) for s in ctx] for u in units]
        rows = [self.recompute[self._row(s)] for s in ctx]
        return [[0] * len(ctx) if self.resident[u] else [row[u] for row in rows] for u in units]

    @property
    def staging_slots(self) -> int:
        """GPU staging buffers: one per layer in flight (lookahead 1: double buffering; 0, the
        paper's schedule: one, so layer i's copies wait until layer i-1 is done with it)."""
        return self.lookahead + 1

    def staging_slot(self, layer: int) -> int:
        """The k-th offloaded unit stages into slot k % staging_slots."""
        return self.offloaded_units.index(layer) % self.staging_slots

    def streams_weights(self, layer: int) -> bool:
        return bool(self.weights_streamed) and bool(self.weights_streamed[layer])

    @property
    def streamed_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.streams_weights(i)]

    def weight_slot(self, layer: int) -> int:
        """The k-th weight-streamed layer's parameters live in GPU weight slot k % 2 (the
        runtime and the streams pass both ask here)."""
        return self.streamed_layers.index(layer) % WEIGHT_SLOTS

    def max_recompute_tokens(self, max_context: int) -> int:
        """The most tokens any layer recomputes at any context up to `max_context` (included):
        how many rows of activations the CPU pools must keep (the rest are never read back)."""
        if self.forced_fraction is not None:
            return 0 if all(self.resident) else min(max_context, round(self.forced_fraction * max_context) + 1)
        off = self.offloaded_units
        return max((max(row[i] for i in off) for row in self._rows_between(0, max_context)
                    if off), default=0)

    def min_kv_row(self, max_context: int, min_context: int | None = None) -> int:
        """The lowest token row any offloaded layer reads back as K,V at a context in
        [min_context, max_context) (min_context: prompt_len by default). At context s rows
        [l(s), s) are read, so rows below the minimum of l(s) never are: the CPU K,V pools
        need not keep them. max_context when nothing is read; 0 when the plan cannot say."""
        lo = self.prompt_len if min_context is None else min_context
        off = self.offloaded_units
        if not off or lo >= max_context:
            return max_context
        if self.forced_fraction is not None:
            # l(s) = min(s, round(f * s)) never decreases with s: its minimum is at lo
            return self.recompute_tokens(off[0], lo)
        if not self.recompute:
            return 0  # a hand-made plan without a table: keep every row
        # contexts outside the table are refused
        return min((min(row[i] for i in off) for row in self._rows_between(lo, max_context - 1)),
                   default=max_context)

    def to_json(self) -> dict:
        # asdict() walks every int of `recompute` (runs x units): build lists directly
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["resident"] = list(self.resident)
        del d["recompute_from"]
        if self.recompute_from:  # runs: [first context, l per unit]
            del d["recompute"]
            d["recompute_runs"] = [[s, list(r)] for s, r in zip(self.recompute_from, self.recompute)]
        else:
            d["recompute"] = [list(r) for r in self.recompute]
        if not self.recompute_from and self.forced_fraction is None \
                and self.max_context == self.prompt_len + self.gen_len:
            del d["max_context"]  # the old layout's manifests stay as they were
        d["predicted_step_ms"] = list(self.predicted_step_ms)
        d["notes"] = json.loads(json.dumps(self.notes))
        if self.cpu:
            d["cpu"] = [list(r) for r in self.cpu]
        if self.bare:
            d["bare"] = [list(r) for r in self.bare]
        for name, none in (("cpu", ()), ("cpu_fraction", None), ("cpu_threads", 0), ("cpu_gbps", 0.0),
                           ("bare", ())):
            if getattr(self, name) == none:  # plans without the CPU lane stay as they were
                del d[name]
        if self.weights_streamed:
            d["weights_streamed"] = list(self.weights_streamed)
        else:  # manifests of plans that stream nothing stay as they were
            del d["weights_streamed"]
        if self.micro_batches == 1:
            del d["micro_batches"]
        if self.world_size == 1:  # one-GPU plans stay as they were
            del d["world_size"]
        if self.split == "rows":  # row-split and one-GPU plans stay as they were
            del d["split"]
        if not self.cuda_graphs:  # manifests of plans made before CUDA graphs stay as they were
            del d["cuda_graphs"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        d = dict(d)
        d["resident"] = tuple(d["resident"])
        if "recompute_runs" in d:
            if "recompute" in d:
                raise ValueError("plan: both recompute and recompute_runs")
            runs = d.pop("recompute_runs")
            d["recompute_from"] = tuple(int(first) for first, _ in runs)
            d["recompute"] = tuple(tuple(r) for _, r in runs)
        else:
            d["recompute"] = tuple(tuple(r) for r in d.get("recompute", ()))
        d["predicted_step_ms"] = tuple(d.get("predicted_step_ms", ()))
        d["cpu"] = tuple(tuple(r) for r in d.get("cpu", ()))
        d["bare"] = tuple(tuple(r) for r in d.get("bare", ()))
        d["weights_streamed"] = tuple(float(x) for x in d.get("weights_streamed", ()))
        return cls(**d)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)


def forced_plan(mode: str, num_layers: int, prompt_len: int, gen_len: int, chunk_tokens: int,
                fraction: float, act_chunks: int = 4, micro_batches: int = 1,
                max_context: int = 0, cpu_fraction: float | None = None) -> Plan:
    """l = round(fraction * s) in every layer: for tests and experiments (schedule.recompute_fraction).
    `max_context` 0: prompt_len + gen_len. `cpu_fraction`: the CPU attention lane takes that
    fraction of every offloaded unit's cached tokens (schedule.cpu_attention_fraction)."""
    return Plan(mode=mode, num_layers=num_layers, prompt_len=prompt_len, gen_len=gen_len,
                chunk_tokens=chunk_tokens, max_context=max_context,
                resident=(not mode_of(mode).offloads,) * (num_layers * micro_batches),
                forced_fraction=float(fraction), micro_batches=micro_batches,
                cpu_fraction=None if cpu_fraction is None else float(cpu_fraction),
                **mode_of(mode).overlap(act_chunks))


def spread_layers(num_layers: int, count: int) -> tuple[bool, ...]:
    """`count` of `num_layers` layers, spread evenly (centred in equal bands): which layers
    stream their weights for a given number of streamed layers."""
    count = max(0, min(num_layers, int(count)))
    if count == 0:
        return ()
    chosen = {int((k + 0.5) * num_layers / count) for k in range(count)}
    return tuple(i in chosen for i in range(num_layers))


def weights_for_fraction(num_layers: int, fraction: float) -> tuple[bool, ...]:
    """schedule.weight_stream_fraction -> the streamed layers (rounded to whole layers)."""
    return spread_layers(num_layers, int(fraction * num_layers + 0.5))


def streamed_prefix(sizes: list[int], fraction: float) -> int:
    """How many of a layer's parameters stream for `fraction` of its elements: parameters
    are taken largest first (`sizes` sorted descending; ties are the same size, so any order
    among them streams the same bytes), as few as reach the fraction. The scheduler rounds
    its LP's fractions with this and the runtime picks the parameters with it."""
    need, acc = float(fraction) * sum(sizes) - 0.5, 0
    if fraction <= 0:
        return 0
    for k, n in enumerate(sizes, 1):
        acc += n
        if acc >= need:
            return k
    return len(sizes)


def rounded_fraction(sizes: list[int], fraction: float) -> float:
    """The fraction of the layer's elements that `streamed_prefix` really streams."""
    k = streamed_prefix(sizes, fraction)
    return sum(sizes[:k]) / sum(sizes) if k else 0.0

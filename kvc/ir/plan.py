"""Plan: the split chosen per layer and per context length. Made by the scheduler, read by
the passes and the runtime, stored in the artifact manifest.

Per layer and context s (the number of cached tokens at a decode step), tokens
[0, l) are recomputed from CPU activations and tokens [l, s) are transferred as K,V, unless
the layer is resident (its whole cache lives on the GPU, growing). `l` is looked up for
exactly the context asked: a Plan refuses a context it was not solved for.

Units (issue 6, the block schedule): with `micro_batches` m > 1 the batch is split into m
equal micro-batches, and each layer runs once per micro-batch, in block order: unit
u = layer * m + k is layer u // m on micro-batch k. Everything the cache touches (`resident`,
`recompute` rows, staging slots, pools, events) is per unit; weights stay per layer, loaded
once for all m units of their layer. With m = 1 units are layers.
"""
from __future__ import annotations

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
    # recompute[j][u]: l for unit u at context s = prompt_len + j (j in 0..gen_len)
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

    def __post_init__(self):
        if len(self.resident) != self.num_units:
            raise ValueError(f"plan: {len(self.resident)} resident flags for {self.num_units} units "
                             f"({self.num_layers} layers x {self.micro_batches} micro-batches)")

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
        """l for unit `layer` (a layer, when micro_batches is 1) at context s."""
        if self.forced_fraction is not None:
            return 0 if self.resident[layer] else min(s, max(0, round(self.forced_fraction * s)))
        j = s - self.prompt_len
        if self.resident[layer] and not self.recompute:
            return 0  # a hand-made all-resident plan may carry no rows
        if not 0 <= j < len(self.recompute):
            raise ValueError(
                f"the plan covers contexts {self.prompt_len}..{self.prompt_len + len(self.recompute) - 1}"
                f" tokens, not {s}; compile with a workload that covers it"
            )
        return 0 if self.resident[layer] else self.recompute[j][layer]

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
        """The most tokens any layer recomputes at any context up to `max_context`: how many
        rows of activations the CPU pools must keep (the rest are never read back)."""
        if self.forced_fraction is not None:
            return 0 if all(self.resident) else min(max_context, round(self.forced_fraction * max_context) + 1)
        return max((max(row) for row in self.recompute), default=0)

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
        first = max(lo, self.prompt_len) - self.prompt_len  # contexts outside the table are refused
        last = min(max_context - self.prompt_len, len(self.recompute))
        return min((min(row[i] for i in off) for row in self.recompute[first:last]),
                   default=max_context)

    def to_json(self) -> dict:
        # asdict() walks every int of `recompute` (gen_len x layers): build lists directly
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["resident"] = list(self.resident)
        d["recompute"] = [list(r) for r in self.recompute]
        d["predicted_step_ms"] = list(self.predicted_step_ms)
        d["notes"] = json.loads(json.dumps(self.notes))
        if self.weights_streamed:
            d["weights_streamed"] = list(self.weights_streamed)
        else:  # manifests of plans that stream nothing stay as they were
            del d["weights_streamed"]
        if self.micro_batches == 1:
            del d["micro_batches"]
        if not self.cuda_graphs:  # manifests of plans made before CUDA graphs stay as they were
            del d["cuda_graphs"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        d = dict(d)
        d["resident"] = tuple(d["resident"])
        d["recompute"] = tuple(tuple(r) for r in d.get("recompute", ()))
        d["predicted_step_ms"] = tuple(d.get("predicted_step_ms", ()))
        d["weights_streamed"] = tuple(float(x) for x in d.get("weights_streamed", ()))
        return cls(**d)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)


def forced_plan(mode: str, num_layers: int, prompt_len: int, gen_len: int, chunk_tokens: int,
                fraction: float, act_chunks: int = 4, micro_batches: int = 1) -> Plan:
    """l = round(fraction * s) in every layer: for tests and experiments (schedule.recompute_fraction)."""
    return Plan(mode=mode, num_layers=num_layers, prompt_len=prompt_len, gen_len=gen_len,
                chunk_tokens=chunk_tokens,
                resident=(not mode_of(mode).offloads,) * (num_layers * micro_batches),
                forced_fraction=float(fraction), micro_batches=micro_batches,
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

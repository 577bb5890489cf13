"""PlanRequest: everything a plan is asked for, built once from a Config.

Every entry point that makes a plan (compile, `kvc plan`, inspect, bench, the policy search)
builds one with `PlanRequest.from_config` and hands it to the planner whole, so no entry
point can drop a setting the others honour (tests/test_request.py holds `kvc plan` and
`kvc compile` to the same plan under every schedule override).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from kvc.errors import KvcError
from kvc.ir.modes import Mode, mode


@dataclass(frozen=True)
class PlanRequest:
    batch_size: int
    prompt_len: int
    gen_len: int
    dtype: str
    mode: str = "pipelined"
    chunk_tokens: int = 64
    act_chunks: int = 4
    recompute_fraction: float | None = None
    weight_stream_fraction: float | None = None
    time_limit_s: float = 10.0
    micro_batches: int = 1
    resident_cache: bool = True
    cuda_graphs: bool = False
    # the longest context the plan must serve (workload.max_context); None: the model's
    # maximum positions, capped by what the memory holds (the planner fills it in:
    # kvc.planner.memory.default_max_context)
    max_context: int | None = None
    # the CPU attention lane (issue 17): "auto", the LP decides per layer (none when it does
    # not pay or the machine has none, hardware.cpu_attn_gbps 0; the default:
    # kvc.config.schema says why), or "off"; a set fraction forces c = round(fraction * n) of every
    # offloaded unit's n cached tokens whatever cpu_attention says (tests and experiments,
    # like recompute_fraction)
    cpu_attention: str = "auto"
    cpu_attention_fraction: float | None = None
    # several GPUs (issue 18, parallel.world_size): each of world_size ranks decodes
    # rank_batch = ceil(batch_size / world_size) rows (the last rank's short share padded with
    # copies); the plan is made for one rank
    world_size: int = 1
    # parallel.split: "rows" (above) or "tokens": every rank decodes every row (rank_batch =
    # batch_size) and attends to 1/world_size of each offloaded layer's cached tokens; the
    # plan is one rank's over its share of the context (kvc.planner.scheduler). Ignored when
    # world_size is 1
    split: str = "rows"

    def __post_init__(self):
        mode(self.mode)  # a KvcError naming the modes, for a request built by hand
        for name, key, least in (("batch_size", "workload.batch_size", 1),
                                 ("prompt_len", "workload.prompt_len", 1),
                                 ("gen_len", "workload.gen_len", 0),
                                 ("chunk_tokens", "schedule.chunk_tokens", 1),
                                 ("act_chunks", "schedule.act_chunks", 1),
                                 ("micro_batches", "workload.num_gpu_batches", 1),
                                 ("world_size", "parallel.world_size", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise KvcError(f"{key} = {v!r}: expected an integer >= {least}")
        mc = self.max_context
        if mc is not None and (isinstance(mc, bool) or not isinstance(mc, int)
                               or mc < self.workload_end):
            raise KvcError(f"workload.max_context = {mc!r}: expected null or an integer >= "
                           f"workload.prompt_len + workload.gen_len = {self.workload_end}")
        for name in ("recompute_fraction", "weight_stream_fraction", "cpu_attention_fraction"):
            f = getattr(self, name)
            if f is not None and not 0.0 <= f <= 1.0:
                raise KvcError(f"schedule.{name} = {f}: expected null or 0..1")
        check_cpu_attention(self.cpu_attention, self.cpu_attention_fraction,
                            self.recompute_fraction, self.schedule)
        check_split(self.split)
        if self.world_size > 1 and self.split == "rows":
            self._check_ranks()
        elif self.world_size > 1 and self.tokens:
            self._check_tokens()
        if (self.world_size == 1 or self.tokens) and self.batch_size % self.micro_batches:
            raise KvcError(f"workload.batch_size = {self.batch_size} does not split into "
                           f"workload.num_gpu_batches = {self.micro_batches} equal micro-batches;"
                           f" use a multiple of {self.micro_batches}")

    def _check_ranks(self) -> None:
        n, b, m = self.world_size, self.batch_size, self.micro_batches
        if n > b:
            raise KvcError(f"parallel.world_size = {n} is more ranks than workload.batch_size = {b}"
                           f" rows: a rank would have no rows; use at most {b} ranks, a batch of"
                           f" at least {n}, or parallel.split=tokens (every rank decodes every row"
                           " and attends to its share of each layer's context)")
        if self.rank_batch % m:
            raise KvcError(f"workload.batch_size = {b} over parallel.world_size = {n} gives each "
                           f"rank {self.rank_batch} rows, which do not split into "
                           f"workload.num_gpu_batches = {m} equal micro-batches; use a batch whose"
                           f" share per rank is a multiple of {m} (e.g. {n * m * -(-self.rank_batch // m)})")

    def _check_tokens(self) -> None:
        """A token split: what it cannot plan, one line each."""
        n = self.world_size
        if not self.schedule.offloads:
            raise KvcError(f"parallel.split = tokens splits each offloaded layer's cached tokens over"
                           f" parallel.world_size = {n} ranks, but schedule.mode = {self.mode} keeps "
                           "the cache on the GPU; use an offloading mode, or parallel.split=rows")
        f = self.cpu_attention_fraction
        if f is not None and f > 0:
            raise KvcError(f"schedule.cpu_attention_fraction = {f} with parallel.split = tokens: the "
                           "CPU attention lane is not planned for a token split; set the fraction "
                           "to null, or use parallel.split=rows")

    @property
    def tokens(self) -> bool:
        """A token split over several ranks (parallel.split tokens, world_size > 1)."""
        return self.world_size > 1 and self.split == "tokens"

    @property
    def rank_batch(self) -> int:
        """The rows each rank decodes: ceil(batch_size / world_size) (a row split), or every
        row (a token split)."""
        if self.tokens:
            return self.batch_size
        return -(-self.batch_size // self.world_size)

    @classmethod
    def from_config(cls, cfg) -> "PlanRequest":
        """From a kvc.config.Config (its workload, model dtype and schedule sections)."""
        w, s = cfg.workload, cfg.schedule
        return cls(batch_size=w.batch_size, prompt_len=w.prompt_len, gen_len=w.gen_len,
                   dtype=cfg.model.dtype, mode=s.mode, chunk_tokens=s.chunk_tokens,
                   act_chunks=s.act_chunks, recompute_fraction=s.recompute_fraction,
                   weight_stream_fraction=s.weight_stream_fraction,
                   time_limit_s=s.solver_time_limit_s, micro_batches=w.num_gpu_batches,
                   resident_cache=s.resident_cache, cuda_graphs=s.cuda_graphs,
                   max_context=w.max_context, cpu_attention=s.cpu_attention,
                   cpu_attention_fraction=s.cpu_attention_fraction,
                   world_size=cfg.parallel.world_size, split=cfg.parallel.split)

    @property
    def schedule(self) -> Mode:
        return mode(self.mode)

    @property
    def workload_end(self) -> int:
        """The longest context of the workload the predictions are reported for (its decode
        contexts are prompt_len..workload_end); max_context is never below it."""
        return self.prompt_len + self.gen_len

    @property
    def workload_contexts(self) -> range:
        return range(self.prompt_len, self.workload_end + 1)

    def but(self, **changes) -> "PlanRequest":
        """This request with some fields changed (another mode, batch, ...)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def cpu_lane_allowed(self) -> bool:
        """The planner may give the CPU attention lane tokens (the machine must have one too):
        a mode that offloads, schedule.cpu_attention auto or a forced fraction above 0."""
        if not self.schedule.offloads:
            return False
        if self.cpu_attention_fraction is not None:
            return self.cpu_attention_fraction > 0
        return self.cpu_attention == "auto"


CPU_ATTENTION = ("auto", "off")
SPLITS = ("rows", "tokens")  # parallel.split


def check_split(value) -> None:
    """parallel.split, one line."""
    if value not in SPLITS:
        raise KvcError(f"parallel.split = {value!r}; expected one of {list(SPLITS)} (rows: each rank"
                       " decodes its share of the batch's rows; tokens: its share of each layer's "
                       "cached tokens)")


def check_cpu_attention(value, fraction, recompute_fraction, mode: Mode) -> None:
    """schedule.cpu_attention and schedule.cpu_attention_fraction together, one line each."""
    if value not in CPU_ATTENTION:
        raise KvcError(f"schedule.cpu_attention = {value!r}; expected one of {list(CPU_ATTENTION)}")
    if fraction is None or fraction == 0:
        return
    if not mode.offloads:
        raise KvcError(f"schedule.cpu_attention_fraction = {fraction}: schedule.mode = {mode.name}"
                       " keeps the cache on the GPU, there is nothing to attend to on the CPU; "
                       "use an offloading mode or set the fraction to null")
    if recompute_fraction is not None and recompute_fraction + fraction > 1:
        raise KvcError(f"schedule.recompute_fraction + schedule.cpu_attention_fraction = "
                       f"{recompute_fraction} + {fraction} > 1: they split the same tokens")

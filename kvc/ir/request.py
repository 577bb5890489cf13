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

    def __post_init__(self):
        mode(self.mode)  # a KvcError naming the modes, for a request built by hand
        for name, key, least in (("batch_size", "workload.batch_size", 1),
                                 ("prompt_len", "workload.prompt_len", 1),
                                 ("gen_len", "workload.gen_len", 0),
                                 ("chunk_tokens", "schedule.chunk_tokens", 1),
                                 ("act_chunks", "schedule.act_chunks", 1),
                                 ("micro_batches", "workload.num_gpu_batches", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise KvcError(f"{key} = {v!r}: expected an integer >= {least}")
        mc = self.max_context
        if mc is not None and (isinstance(mc, bool) or not isinstance(mc, int)
                               or mc < self.workload_end):
            raise KvcError(f"workload.max_context = {mc!r}: expected null or an integer >= "
                           f"workload.prompt_len + workload.gen_len = {self.workload_end}")
        for name in ("recompute_fraction", "weight_stream_fraction"):
            f = getattr(self, name)
            if f is not None and not 0.0 <= f <= 1.0:
                raise KvcError(f"schedule.{name} = {f}: expected null or 0..1")
        if self.batch_size % self.micro_batches:
            raise KvcError(f"workload.batch_size = {self.batch_size} does not split into "
                           f"workload.num_gpu_batches = {self.micro_batches} equal micro-batches;"
                           f" use a multiple of {self.micro_batches}")

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
                   max_context=w.max_context)

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

"""The config's shape: the typed dataclasses, the Hydra groups, and the bounds (LIMITS) any
input is held to."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kvc.hardware import HardwareConfig

GROUPS = ("hardware", "schedule")

# What any input may ask for (model.yaml, overrides, a config dict, an artifact's manifest):
# far above every real model and machine, low enough that a crafted number cannot make kvc
# allocate, solve or loop without end. kvc.artifact holds manifests to the same bounds.
MAX_YAML_BYTES = 1 << 20  # a model.yaml or hardware profile
MAX_DEPTH = 32  # nesting of mappings and lists in one
MAX_OVERRIDES, MAX_OVERRIDE_CHARS = 1000, 4096
LIMITS = {
    "batch_size": 1 << 16,
    "context": 1 << 22,  # prompt_len + gen_len, max_context
    "num_gpu_batches": 64,
    "chunk_tokens": 1 << 22,
    "act_chunks": 64,
    "cpu_threads": 4096,  # hardware.cpu_attn_threads, a plan's cpu_threads
    "mem_gb": 1e6,  # gpu_mem_gb, cpu_mem_gb, mem_margin_gb
    "solver_time_limit_s": 86400.0,
    "seed": (1 << 63) - 1,
    # a model's shape (ModelSpec): what a manifest's model_spec is held to
    "num_layers": 512,
    "width": 1 << 18,  # hidden_size, intermediate_size, head_dim
    "heads": 1 << 12,  # num_heads, num_kv_heads
    "vocab_size": 1 << 24,
    "max_positions": 1 << 24,
    "world_size": 1024,  # parallel.world_size, a plan's world_size
}


@dataclass
class ModelConfig:
    checkpoint: str | None = None
    preset: str | None = None
    dtype: str = "float16"  # a name of kvc.dtypes.DTYPES
    seed: int = 0


@dataclass
class WorkloadConfig:
    batch_size: int = 1
    prompt_len: int = 128
    gen_len: int = 32
    num_gpu_batches: int = 1
    # the longest context an artifact serves (any prompt and generation up to it; prompt_len
    # and gen_len are the workload its predictions are reported for). null: the model's
    # maximum positions, capped by what the host memory (and in gpu_resident the GPU) holds
    max_context: int | None = None


@dataclass
class ScheduleConfig:
    mode: str = "pipelined"  # a row of kvc.ir.modes.MODES
    recompute_fraction: float | None = None
    # set: stream this fraction of the layers' weights from pinned CPU memory (whole layers,
    # spread evenly); null: stream only what gpu_mem_gb forces (tests and experiments)
    weight_stream_fraction: float | None = None
    # false: every layer's KV cache lives in CPU memory even where the GPU budget could hold
    # some (FlexGen's "--percent x y 0 100" setting); true: the LP may keep layers resident
    resident_cache: bool = True
    chunk_tokens: int = 64
    act_chunks: int = 4
    solver_time_limit_s: float = 10.0
    # on a CUDA device, replay each decode step's static runs (projections, norms, MLP) as
    # CUDA graphs; the cache ops and attention stay eager (kvc.passes.cudagraphs)
    cuda_graphs: bool = True
    # the CPU attention lane (issue 17): auto, the LP decides per layer how many of the oldest
    # cached tokens the CPU attends to in place (none when it does not pay, or when
    # hardware.cpu_attn_gbps is 0: every preset but h200-pcie5, and `kvc profile` measures
    # it), and the decode steps run with the lane only while they time faster with it than
    # with the plan without it (kvc.runtime.lane_guard); off: never. Auto by default since
    # session 14: with the guard it ran 0.83-0.88x off at the three H200 points of issue 17
    # in one call, where the host's rate inside the steps had made unguarded auto up to
    # 1.18x slower than off (docs/BENCHMARKS.md)
    cpu_attention: str = "auto"
    # set: force c = round(fraction * n) of every offloaded layer's n cached tokens onto the
    # CPU lane, whatever cpu_attention says (tests and experiments, like recompute_fraction);
    # null: the LP's (cpu_attention auto) or none (off)
    cpu_attention_fraction: float | None = None


@dataclass
class ParallelConfig:
    # several GPUs (issue 18): one process per GPU under torch.distributed, each decoding
    # ceil(batch_size / world_size) rows of the batch over its own PCIe link, weights
    # replicated; after each step the ranks all-gather the last position's logits
    world_size: int = 1
    # how the work is split over world_size ranks: "rows" (above) or "tokens", for batches
    # too small to split by rows (one long context): every rank decodes every row, and each
    # offloaded layer's cached tokens are cut into world_size contiguous shares, each rank
    # attending to its own over its own link; the partial outputs are merged exactly by
    # log-sum-exp after an all-gather per layer. Every rank's host pools keep every row (a
    # full replica). Ignored when world_size is 1
    split: str = "rows"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

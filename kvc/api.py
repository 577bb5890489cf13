"""The pipeline, stage by stage (docs/ARCHITECTURE.md "Data flow"): the one module that
drives every layer below it.

    compile:  model.yaml + overrides -> Config -> ModelSpec, HardwareConfig, PlanRequest
              -> Plan (planner) -> meta model -> lowered graphs (compiler) -> artifact folder
    load:     artifact folder -> manifest -> model with weights -> lowered graphs (the same
              compiler, the stored Plan) -> CompiledModel (runtime), its decode step
              partitioned into CUDA graph segments when the Plan says so

Every stage is a plain function of the previous stages' outputs; the CLI and `kvc.compile` /
`kvc.load` call `compile_artifact` / `load_artifact`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kvc.config import Config, check_fits_model, from_dict, load_config
from kvc.dtypes import torch_dtype
from kvc.errors import KvcError
from kvc.hardware import HardwareConfig
from kvc.ir.plan import Plan
from kvc.ir.request import PlanRequest
from kvc.models.spec import ModelSpec


@dataclass
class Resolved:
    """A config with everything it names looked up: the model's shape and the machine."""

    config: Config
    spec: ModelSpec
    hardware: HardwareConfig

    @property
    def request(self) -> PlanRequest:
        """What every entry point plans from (compile, plan, inspect, bench, search)."""
        return PlanRequest.from_config(self.config)


def resolve_spec(cfg: Config) -> ModelSpec:
    from kvc.models import preset, spec_from_checkpoint

    if cfg.model.preset is not None:
        return preset(cfg.model.preset)
    return spec_from_checkpoint(cfg.model.checkpoint)


def resolve(config, overrides: list[str] | tuple = (), progress: bool | None = None) -> Resolved:
    """`progress`: draw the profiler's bar if `auto` hardware has to be measured (None:
    follow kvc.progress.enabled, which the CLI switches on)."""
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    spec = resolve_spec(cfg)
    check_fits_model(cfg, spec.max_positions)
    from kvc.profiler.resolve import resolve_hardware
    from kvc.progress import is_enabled

    hw = resolve_hardware(cfg.hardware, progress=is_enabled() if progress is None else progress)
    return Resolved(replace(cfg, hardware=hw), spec, hw)


def make_plan(r: Resolved) -> Plan:
    """The scheduler's plan (a forced recompute_fraction still gets its memory check and
    predicted step times from the same cost model)."""
    from kvc.planner.scheduler import make_plan as solve

    return solve(r.spec, r.hardware, r.request)


def compile_artifact(config, overrides: list[str] | tuple = (), output=None,
                     progress: bool | None = None) -> Path:
    from kvc.artifact import write_artifact
    from kvc.compiler.lowering import lower
    from kvc.models import build_model
    from kvc.progress import bar

    r = resolve(config, overrides, progress=progress)
    with bar("kvc: compiling", total=3, unit="stage") as stages:
        stages.set_description("kvc: compiling (solving the plan)")
        plan = make_plan(r)
        stages.update()
        stages.set_description("kvc: compiling (trace + passes)")
        # shapes are all tracing needs: no weights are made or read at compile time
        model = build_model(r.spec, "meta", r.config.model.dtype)
        lowered = lower(model, plan)
        stages.update()
        stages.set_description("kvc: compiling (writing the artifact)")
        out = Path(output) if output is not None else Path(default_output_name(config, r.config))
        path = write_artifact(out, r, plan, lowered)
        stages.update()
    return path


def default_output_name(source, cfg: Config) -> str:
    if isinstance(source, (str, Path)):
        return Path(source).stem + ".kvc"
    name = cfg.model.preset or Path(cfg.model.checkpoint or "model").name
    return f"{name}.kvc"


def assemble(lowered, plan: Plan, spec: ModelSpec, dtype, device, manifest: dict | None = None,
             cuda_graphs: bool | None = None, model_class=None, ranks=None):
    """A CompiledModel from lowered graphs: the runtime, handed the CUDA-graph partition pass
    when the decode step should run as graphed segments. `cuda_graphs` None: as the Plan says,
    on a CUDA device only; True on a CPU runs the segments eagerly (how tests check them).
    `model_class`: a CompiledModel subclass to make (load_artifact's kvc.text.TextModel).
    `ranks`: this process's place in a multi-GPU job (kvc.runtime.parallel; None: alone)."""
    from kvc.passes.cudagraphs import partition
    from kvc.runtime.executor import CompiledModel
    from kvc.runtime.parallel import SINGLE

    device = torch.device(device)
    if cuda_graphs is None:
        # the CPU attention lane's two nodes per unit (cpu_attn_begin, the attention that
        # merges) are eager nodes of the partition like every kvc op: graphs around them
        cuda_graphs = plan.cuda_graphs and device.type == "cuda"
    return (model_class or CompiledModel)(lowered, plan, spec, torch_dtype(dtype), device, manifest,
                                          partition=partition if cuda_graphs else None,
                                          ranks=ranks or SINGLE)


def check_device(device) -> torch.device:
    """cpu, cuda or cuda:N of this machine (None: cuda if present); a KvcError for anything
    else (foo, '', meta, mps), before anything is loaded."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise KvcError(f"device {device!r}: kvc runs on cpu or cuda (cuda:N for the N-th GPU)") from None
    if d.type not in ("cpu", "cuda") or (d.type == "cpu" and d.index not in (None, 0)):
        raise KvcError(f"device {device!r}: kvc runs on cpu or cuda (cuda:N for the N-th GPU)")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise KvcError("device 'cuda' asked for, but this machine has no CUDA device; "
                       "load with device='cpu' (the same schedule runs there, without streams)")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise KvcError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return d


def join_job(plan: Plan, device: torch.device):
    """(Ranks, device): this process's place in a torch.distributed job (a single process
    outside one), held to the world size the plan was made for: a plan is one rank's share."""
    from kvc.runtime.parallel import join

    ranks, device = join(device)
    ranks = replace(ranks, split=getattr(plan, "split", "rows"))
    want = getattr(plan, "world_size", 1)
    if ranks.world != want:
        how = ("run it in one process" if want == 1 else
               f"start it with torchrun --nproc-per-node {want} (or kvc run --nproc {want})")
        raise KvcError(f"this artifact was compiled for parallel.world_size = {want} but the job "
                       f"has {ranks.world} process(es): {how}, or recompile with "
                       f"parallel.world_size={ranks.world}")
    return ranks, device


def load_tokenizer_of(weights: dict):
    """The checkpoint's tokenizer, None for dummy weights or a folder without tokenizer files
    (a tokenizer file that is there but unreadable is an error)."""
    from kvc.tokenizer import load_tokenizer

    if weights.get("kind") != "checkpoint":
        return None
    folder = Path(weights["path"])
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    return load_tokenizer(folder)


# what kvc.tokenizer can build a tokenizer from (tokenizer.json, or AutoTokenizer's files)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "tokenizer_config.json")


def load_artifact(path, device=None):
    """Rebuild a compiled artifact into a kvc.text.TextModel: a CompiledModel (kvc.artifact
    checks what it names) with the checkpoint's tokenizer and text-level generation."""
    from kvc.artifact import MANIFEST, check_weights, read_manifest
    from kvc.compiler.lowering import lower
    from kvc.models import build_model
    from kvc.runtime.weights import place_streamed
    from kvc.text import TextModel

    manifest = read_manifest(path)
    try:
        cfg = from_dict(manifest["config"], where=f"{path}/{MANIFEST}")
        plan = Plan.from_json(manifest["plan"])
    except (TypeError, KeyError, ValueError) as e:
        raise KvcError(f"{path}/{MANIFEST}: damaged manifest ({e}); recompile the artifact") from None
    spec = resolve_spec(cfg)
    if spec.to_dict() != manifest["model_spec"]:
        raise KvcError(f"{path}: the model's config changed since compile; recompile")
    checkpoint = check_weights(manifest["weights"])
    tokenizer = load_tokenizer_of(manifest["weights"])  # a broken one fails before the weights load
    device = check_device(device)
    ranks, device = join_job(plan, device)
    # weight-streamed parameters are built (drawn or loaded) straight into their pinned pool
    place = place_streamed(plan, device) if plan.streamed_layers else None
    model = build_model(spec, device, cfg.model.dtype, seed=cfg.model.seed, checkpoint=checkpoint,
                        place=place)
    lowered = lower(model, plan)
    if lowered.code_hash != manifest["code_hash"]:
        raise KvcError(f"{path}: regenerated code differs from the compiled code (hash "
                       f"{lowered.code_hash[:12]} != {manifest['code_hash'][:12]}); this kvc or "
                       "torch version lowers it differently: recompile")
    model = assemble(lowered, plan, spec, cfg.model.dtype, device, manifest, model_class=TextModel,
                     ranks=ranks)
    model.tokenizer = tokenizer
    return model

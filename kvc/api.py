"""The compile pipeline, stage by stage (DESIGN.md "Data flow"):

    model.yaml + overrides -> Config -> ModelSpec -> HardwareProfile -> Plan
    -> meta model -> traced graphs + passes -> artifact folder

Every stage is a plain function of the previous stages' outputs; the CLI and `kvc.compile`
both call `compile_artifact`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from kvc.config import Config, check_fits_model, load_config
from kvc.hardware import HardwareConfig
from kvc.models.spec import ModelSpec
from kvc.plan import Plan


@dataclass
class Resolved:
    """A config with everything it names looked up: the model's shape and the machine."""

    config: Config
    spec: ModelSpec
    hardware: HardwareConfig


def resolve_spec(cfg: Config) -> ModelSpec:
    from kvc.models import preset, spec_from_hf_config
    from kvc.models.checkpoint import read_config

    if cfg.model.preset is not None:
        return preset(cfg.model.preset)
    return spec_from_hf_config(read_config(cfg.model.checkpoint),
                               where=str(Path(cfg.model.checkpoint) / "config.json"))


def resolve(config, overrides: list[str] | tuple = (), progress: bool | None = None) -> Resolved:
    """`progress`: draw the profiler's bar if `auto` hardware has to be measured (None:
    follow kvc.progress.enabled, which the CLI switches on)."""
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    spec = resolve_spec(cfg)
    check_fits_model(cfg, spec.max_positions, spec.sliding_window)
    from kvc.profiler import resolve_hardware

    from kvc.progress import is_enabled

    hw = resolve_hardware(cfg.hardware, progress=is_enabled() if progress is None else progress)
    return Resolved(replace(cfg, hardware=hw), spec, hw)


def make_plan(r: Resolved) -> Plan:
    """The scheduler's plan (a forced recompute_fraction still gets its memory check and
    predicted step times from the same cost model)."""
    from kvc.scheduler import make_plan as solve

    cfg, s, w = r.config, r.config.schedule, r.config.workload
    return solve(r.spec, r.hardware, batch_size=w.batch_size, prompt_len=w.prompt_len,
                 gen_len=w.gen_len, dtype=cfg.model.dtype, mode=s.mode,
                 chunk_tokens=s.chunk_tokens, act_chunks=s.act_chunks,
                 recompute_fraction=s.recompute_fraction,
                 weight_stream_fraction=s.weight_stream_fraction,
                 time_limit_s=s.solver_time_limit_s, micro_batches=w.num_gpu_batches,
                 resident_cache=s.resident_cache, cuda_graphs=s.cuda_graphs)


def compile_artifact(config, overrides: list[str] | tuple = (), output=None,
                     progress: bool | None = None) -> Path:
    from kvc.artifact import write_artifact
    from kvc.lowering import lower
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

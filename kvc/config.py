"""Config: conf/ defaults + a user's model.yaml + overrides -> validated dataclasses.

The only module that knows Hydra. Precedence, lowest first: the packaged defaults
(`kvc.conf`), the user's model.yaml, then override strings (`hardware=h100-pcie5`,
`hardware.h2d_gbps=40`). Hydra is composed in its context-manager form and any Hydra the
host application had initialised is put back afterwards.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from kvc.dtypes import NAMES as DTYPE_NAMES
from kvc.errors import KvcError
from kvc.hardware import HardwareConfig
from kvc.ir.modes import NAMES as MODE_NAMES

GROUPS = ("hardware", "schedule")


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


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- loading ---------------------------------------------------------------------------

def load_config(source: str | Path | dict | None = None, overrides: list[str] | tuple = ()) -> Config:
    """A model.yaml path (or an equivalent dict, or None for the defaults) plus overrides."""
    user, where = _read_user(source)
    parsed = _parse_overrides(list(overrides))
    choices = {}
    for g in GROUPS:
        picked = user.pop(g, None) if isinstance(user.get(g), str) else None
        if isinstance(user.get(g), dict) and "preset" in user[g] and g == "hardware":
            picked = user[g].pop("preset")
        if g == "schedule" and isinstance(user.get(g), dict) and "mode" in user[g]:
            picked = user[g]["mode"]
        if picked is not None:
            choices[g] = picked
    for o in parsed:
        if o.key_or_group in GROUPS:
            choices[o.key_or_group] = o.value()
        if o.key_or_group == "schedule.mode":  # a mode is also the name of its schedule defaults
            choices["schedule"] = o.value()
    merged = _compose_defaults(choices)
    _deep_merge(merged, user)
    for o in parsed:
        if o.key_or_group not in GROUPS:
            _set_dotted(merged, o.key_or_group, o.value(), o.input_line)
    return from_dict(merged, where)


def from_dict(data: dict, where: str = "config") -> Config:
    cfg = _build(Config, data, "", where)
    _check_ranges(cfg)
    return cfg


def _read_user(source) -> tuple[dict, str]:
    if source is None:
        return {}, "defaults"
    if isinstance(source, dict):
        return _plain(source), "config dict"
    path = Path(source)
    if not path.is_file():
        raise KvcError(f"{path}: no such file; expected a model.yaml (see examples/)")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise KvcError(f"{path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise KvcError(f"{path}: not UTF-8 text (byte {e.start}); expected a YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise KvcError(f"{path}: YAML syntax error{at}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise KvcError(f"{path}: expected a mapping with keys model, workload, hardware, schedule")
    return _plain(data), str(path)


def _plain(d: Any) -> Any:
    if isinstance(d, dict):
        return {str(k): _plain(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_plain(v) for v in d]
    return d


def _parse_overrides(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    out = []
    for s in overrides:
        try:
            (o,) = parser.parse_overrides([s])
        except HydraException as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise KvcError(f"bad override {s!r}: {msg}; expected key=value, e.g. hardware.h2d_gbps=40") from None
        if o.is_delete() or o.is_sweep_override():
            raise KvcError(f"bad override {s!r}: expected key=value (no deletes or sweeps)")
        out.append(o)
    return out


def _compose_defaults(choices: dict) -> dict:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException
    from hydra.initialize import get_gh_backup, restore_gh_from_backup
    from omegaconf import OmegaConf

    for g, v in choices.items():
        options = group_options(g)
        if not isinstance(v, str) or v not in options:
            raise KvcError(f"unknown {g} option {v!r}; expected one of {options}")
    saved = get_gh_backup()  # the host application's Hydra, if any: put back after
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="kvc.conf", version_base=None):
            cfg = compose(config_name="config", overrides=[f"{g}={v}" for g, v in choices.items()])
    except (HydraException, MissingConfigException) as e:
        raise KvcError(f"cannot compose the defaults: {str(e).splitlines()[0]}") from None
    finally:
        restore_gh_from_backup(saved)
    return OmegaConf.to_container(cfg, resolve=True)


def group_options(group: str) -> list[str]:
    from importlib.resources import files

    folder = files("kvc.conf") / group  # conf/ ships inside the package as kvc.conf
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _deep_merge(base: dict, top: dict) -> None:
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v


def _set_dotted(d: dict, key: str, value: Any, line: str) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise KvcError(f"bad override {line!r}: {p!r} is not a section")
        d = nxt
    d[parts[-1]] = _plain(value)


# --- validation ------------------------------------------------------------------------

def _build(cls, data: Any, prefix: str, where: str):
    if not isinstance(data, dict):
        raise KvcError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for k in data:
        if k not in fields:
            raise KvcError(
                f"{where}: unknown key {prefix + k!r}; expected one of {sorted(fields)}"
            )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key + ".", where)
        else:
            kwargs[name] = _check_type(hint, value, key, where)
    return cls(**kwargs)


def _check_type(hint, value, key: str, where: str):
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(inner[0], value, key, where)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise KvcError(f"{where}: {key} = {value!r}; expected one of {list(choices)}")
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is dict and isinstance(value, dict):
        return value
    if hint in (int, str, bool) and type(value) is hint:
        return value
    expected = getattr(hint, "__name__", str(hint))
    raise KvcError(f"{where}: {key} = {value!r} has the wrong type; expected {expected}")


def _check_ranges(cfg: Config) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise KvcError(msg)

    m, w, h, s = cfg.model, cfg.workload, cfg.hardware, cfg.schedule
    need(m.dtype in DTYPE_NAMES, f"model.dtype = {m.dtype!r}; expected one of {list(DTYPE_NAMES)}")
    need((m.checkpoint is None) != (m.preset is None),
         "model: set exactly one of model.checkpoint (a HF folder) or model.preset (a named shape)")
    need(w.batch_size >= 1, f"workload.batch_size = {w.batch_size}; expected an integer >= 1")
    need(w.prompt_len >= 1, f"workload.prompt_len = {w.prompt_len}; expected an integer >= 1")
    need(w.gen_len >= 1, f"workload.gen_len = {w.gen_len}; expected an integer >= 1")
    need(w.num_gpu_batches >= 1, f"workload.num_gpu_batches = {w.num_gpu_batches}; expected >= 1")
    for name in ("h2d_gbps", "d2h_gbps", "bidir_gbps", "gemm_tflops", "attn_gbps"):
        v = getattr(h, name)
        need(v > 0 or h.name == "auto", f"hardware.{name} = {v}; expected a positive number")
    need(h.mem_gbps >= 0, f"hardware.mem_gbps = {h.mem_gbps}; expected a positive number, or 0 "
                          "for attn_gbps's value")
    for name in ("gpu_mem_gb", "cpu_mem_gb"):
        v = getattr(h, name)
        need(v > 0, f"hardware.{name} = {v}; expected a positive number of GB")
    need(s.mode in MODE_NAMES, f"schedule.mode = {s.mode!r}; expected one of {list(MODE_NAMES)}")
    f = s.recompute_fraction
    need(f is None or 0.0 <= f <= 1.0, f"schedule.recompute_fraction = {f}; expected null or 0..1")
    f = s.weight_stream_fraction
    need(f is None or 0.0 <= f <= 1.0, f"schedule.weight_stream_fraction = {f}; expected null or 0..1")
    need(s.chunk_tokens >= 1, f"schedule.chunk_tokens = {s.chunk_tokens}; expected >= 1")
    need(s.act_chunks >= 1, f"schedule.act_chunks = {s.act_chunks}; expected >= 1")


def check_fits_model(cfg: Config, max_positions: int) -> None:
    """Model-dependent ranges, once the model's shape is known."""
    total = cfg.workload.prompt_len + cfg.workload.gen_len
    if total > max_positions:
        raise KvcError(
            f"workload.prompt_len + workload.gen_len = {total} exceeds the model's maximum "
            f"positions ({max_positions}); shorten the prompt or the generation"
        )

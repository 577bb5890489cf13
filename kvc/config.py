"""Config: conf/ defaults + a user's model.yaml + overrides -> validated dataclasses.

The only module that knows Hydra. Precedence, lowest first: the packaged defaults
(`kvc.conf`), the user's model.yaml, then override strings (`hardware=h100-pcie5`,
`hardware.h2d_gbps=40`). Hydra is composed in its context-manager form and any Hydra the
host application had initialised is put back afterwards.
"""
from __future__ import annotations

import dataclasses
import math
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

# What any input may ask for (model.yaml, overrides, a config dict, an artifact's manifest):
# far above every real model and machine, low enough that a crafted number cannot make kvc
# allocate, solve or loop without end. kvc.artifact holds manifests to the same bounds.
MAX_YAML_BYTES = 1 << 20  # a model.yaml or hardware profile
MAX_DEPTH = 32  # nesting of mappings and lists in one
MAX_OVERRIDES, MAX_OVERRIDE_CHARS = 1000, 4096
LIMITS = {
    "batch_size": 1 << 16,
    "context": 1 << 22,  # prompt_len + gen_len
    "num_gpu_batches": 64,
    "chunk_tokens": 1 << 22,
    "act_chunks": 64,
    "mem_gb": 1e6,  # gpu_mem_gb, cpu_mem_gb, mem_margin_gb
    "solver_time_limit_s": 86400.0,
    "seed": (1 << 63) - 1,
    # a model's shape (ModelSpec): what a manifest's model_spec is held to
    "num_layers": 512,
    "width": 1 << 18,  # hidden_size, intermediate_size, head_dim
    "heads": 1 << 12,  # num_heads, num_kv_heads
    "vocab_size": 1 << 24,
    "max_positions": 1 << 24,
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
        return _plain(source, "config dict"), "config dict"
    path = Path(source)
    if not path.is_file():
        raise KvcError(f"{path}: no such file; expected a model.yaml (see examples/)")
    data = load_yaml(read_text_capped(path, MAX_YAML_BYTES, "a model.yaml"), str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise KvcError(f"{path}: expected a mapping with keys model, workload, hardware, schedule")
    return _plain(data, str(path)), str(path)


def read_text_capped(path, limit: int, what: str) -> str:
    """A UTF-8 text file of at most `limit` bytes, read without reading more (a FIFO or
    /dev/zero included: the read stops at limit + 1); one-line KvcErrors otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise KvcError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(data) > limit:
        raise KvcError(f"{path}: larger than {limit // 1024} KiB; {what} is a small text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KvcError(f"{path}: not UTF-8 text (byte {e.start}); expected a YAML file") from None


class _Refused(yaml.composer.ComposerError):
    """Well-formed YAML that kvc will not compose (an alias, too deep)."""


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader without aliases and with a depth bound: a `*name` may stand for a
    subtree any number of times, so a few hundred bytes of nested aliases expand to billions
    of nodes (a "billion laughs"); refusing them while composing costs nothing before."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(
                None, None, f"YAML aliases (*{event.anchor}) are not supported in kvc's "
                "files; write the value out", event.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml(text: str, where: str) -> Any:
    """YAML text -> plain data, through the alias-free loader; errors are one line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        what = "" if isinstance(e, _Refused) else " YAML syntax error"
        raise KvcError(f"{where}:{what}{at}: {problem}".replace(": at line", ", line")) from None
    except RecursionError:  # the scanner's own recursion, before the composer's bound
        raise KvcError(f"{where}: nested deeper than {MAX_DEPTH} levels") from None


def _plain(d: Any, where: str = "config", depth: int = 0) -> Any:
    if depth > MAX_DEPTH:  # a dict that contains itself ends here too
        raise KvcError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(d, dict):
        return {str(k): _plain(v, where, depth + 1) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_plain(v, where, depth + 1) for v in d]
    return d


def _parse_overrides(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    out = []
    if len(overrides) > MAX_OVERRIDES:
        raise KvcError(f"{len(overrides)} overrides; expected at most {MAX_OVERRIDES}")
    for s in overrides:
        if not isinstance(s, str):
            raise KvcError(f"bad override {s!r}: expected a string key=value")
        if len(s) > MAX_OVERRIDE_CHARS:
            raise KvcError(f"bad override {s[:40]!r}...: longer than {MAX_OVERRIDE_CHARS} characters")
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
    d[parts[-1]] = _plain(value, f"override {line!r}")


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
        try:
            return float(value)
        except OverflowError:  # an int past the float range
            raise KvcError(f"{where}: {key} = {value}: too large; expected a finite number") from None
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
    need(0 <= m.seed <= LIMITS["seed"], f"model.seed = {m.seed}; expected 0..{LIMITS['seed']}")
    for name, top in (("batch_size", LIMITS["batch_size"]), ("prompt_len", LIMITS["context"]),
                      ("gen_len", LIMITS["context"]), ("num_gpu_batches", LIMITS["num_gpu_batches"])):
        v = getattr(w, name)
        need(1 <= v <= top, f"workload.{name} = {v}; expected an integer 1..{top}")
    need(w.prompt_len + w.gen_len <= LIMITS["context"],
         f"workload.prompt_len + workload.gen_len = {w.prompt_len + w.gen_len}; expected at most "
         f"{LIMITS['context']} tokens")
    check_hardware(h)
    need(s.mode in MODE_NAMES, f"schedule.mode = {s.mode!r}; expected one of {list(MODE_NAMES)}")
    f = s.recompute_fraction
    need(f is None or 0.0 <= f <= 1.0, f"schedule.recompute_fraction = {f}; expected null or 0..1")
    f = s.weight_stream_fraction
    need(f is None or 0.0 <= f <= 1.0, f"schedule.weight_stream_fraction = {f}; expected null or 0..1")
    for name in ("chunk_tokens", "act_chunks"):
        v, top = getattr(s, name), LIMITS[name]
        need(1 <= v <= top, f"schedule.{name} = {v}; expected an integer 1..{top}")
    t = s.solver_time_limit_s
    need(math.isfinite(t) and 0 < t <= LIMITS["solver_time_limit_s"],
         f"schedule.solver_time_limit_s = {t}; expected a number of seconds in (0, "
         f"{LIMITS['solver_time_limit_s']:g}]")


def check_hardware(h: HardwareConfig, prefix: str = "hardware") -> None:
    """A machine's numbers: finite, positive where a rate, bounded where a size (a config's
    hardware section, a profile, an artifact's manifest)."""
    def need(ok: bool, msg: str):
        if not ok:
            raise KvcError(msg)

    for f in dataclasses.fields(HardwareConfig):
        v = getattr(h, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise KvcError(f"{prefix}.{f.name} = {v}; expected a finite number")
    need(h.device in ("cpu", "cuda"), f"{prefix}.device = {h.device!r}; expected 'cpu' or 'cuda'")
    for name in ("h2d_gbps", "d2h_gbps", "bidir_gbps", "gemm_tflops", "attn_gbps"):
        v = getattr(h, name)
        need(v > 0 or h.name == "auto", f"{prefix}.{name} = {v}; expected a positive number")
    need(h.mem_gbps >= 0, f"{prefix}.mem_gbps = {h.mem_gbps}; expected a positive number, or 0 "
                          "for attn_gbps's value")
    top = LIMITS["mem_gb"]
    for name in ("gpu_mem_gb", "cpu_mem_gb"):
        v = getattr(h, name)
        need(0 < v <= top, f"{prefix}.{name} = {v}; expected a positive number of GB (at most {top:g})")
    need(0 <= h.mem_margin_gb <= top, f"{prefix}.mem_margin_gb = {h.mem_margin_gb}; expected 0..{top:g} GB")
    for name in ("link_latency_us", "gemm_half_rows", "attn_fixed_us", "launch_us", "host_module_us",
                 "host_op_us", "host_view_us", "host_kvc_us", "host_graph_us"):
        v = getattr(h, name)
        need(v >= 0, f"{prefix}.{name} = {v}; expected a number >= 0")
    for name in ("compute_slowdown", "copy_slowdown"):
        v = getattr(h, name)
        need(v > 0, f"{prefix}.{name} = {v}; expected a positive factor")


def hardware_from_dict(data: Any, where: str, prefix: str = "hardware") -> HardwareConfig:
    """A HardwareConfig from a plain mapping (a profile YAML, a manifest), each field
    type-checked like the config's and held to check_hardware's ranges."""
    hw = _build(HardwareConfig, data, prefix + ".", where)
    check_hardware(hw, prefix)
    return hw


def check_fits_model(cfg: Config, max_positions: int) -> None:
    """Model-dependent ranges, once the model's shape is known."""
    total = cfg.workload.prompt_len + cfg.workload.gen_len
    if total > max_positions:
        raise KvcError(
            f"workload.prompt_len + workload.gen_len = {total} exceeds the model's maximum "
            f"positions ({max_positions}); shorten the prompt or the generation"
        )

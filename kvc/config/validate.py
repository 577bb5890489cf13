"""Validation: plain data -> typed dataclasses (unknown keys and wrong types are one line
each), and the ranges of a config and of a machine's numbers."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

from kvc.config.schema import LIMITS, Config
from kvc.dtypes import NAMES as DTYPE_NAMES
from kvc.errors import KvcError
from kvc.hardware import HardwareConfig
from kvc.ir.modes import NAMES as MODE_NAMES
from kvc.ir.modes import mode as mode_of
from kvc.ir.request import check_cpu_attention, check_split


def from_dict(data: dict, where: str = "config") -> Config:
    cfg = _build(Config, data, "", where)
    _check_ranges(cfg)
    return cfg


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
    if hint is str and isinstance(value, bool):  # YAML 1.1: an unquoted off, on, no, yes
        word = "off" if value is False else "on"
        raise KvcError(f"{where}: {key} = {value!r}: YAML reads an unquoted off/on/no/yes as a "
                       f"boolean; expected a string: quote it ({key.rsplit('.', 1)[-1]}: \"{word}\")")
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
    mc, end = w.max_context, w.prompt_len + w.gen_len
    need(mc is None or end <= mc <= LIMITS["context"],
         f"workload.max_context = {mc}; expected null (the model's maximum positions) or an "
         f"integer {end}..{LIMITS['context']} (at least workload.prompt_len + workload.gen_len)")
    check_hardware(h)
    need(s.mode in MODE_NAMES, f"schedule.mode = {s.mode!r}; expected one of {list(MODE_NAMES)}")
    f = s.recompute_fraction
    need(f is None or 0.0 <= f <= 1.0, f"schedule.recompute_fraction = {f}; expected null or 0..1")
    f = s.weight_stream_fraction
    need(f is None or 0.0 <= f <= 1.0, f"schedule.weight_stream_fraction = {f}; expected null or 0..1")
    f = s.cpu_attention_fraction
    need(f is None or 0.0 <= f <= 1.0, f"schedule.cpu_attention_fraction = {f}; expected null or 0..1")
    check_cpu_attention(s.cpu_attention, f, s.recompute_fraction, mode_of(s.mode))
    for name in ("chunk_tokens", "act_chunks"):
        v, top = getattr(s, name), LIMITS[name]
        need(1 <= v <= top, f"schedule.{name} = {v}; expected an integer 1..{top}")
    n = cfg.parallel.world_size
    need(1 <= n <= LIMITS["world_size"],
         f"parallel.world_size = {n}: expected an integer 1..{LIMITS['world_size']}")
    check_split(cfg.parallel.split)
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
    for name in ("cpu_attn_gbps", "cpu_attn_fixed_us"):
        v = getattr(h, name)
        need(v >= 0, f"{prefix}.{name} = {v}; expected a number >= 0"
                     + (" (0: no CPU attention lane)" if name == "cpu_attn_gbps" else ""))
    need(h.host_link_gbps >= 0, f"{prefix}.host_link_gbps = {h.host_link_gbps}; expected a number "
                                ">= 0 (0: no shared host limit known)")
    need(h.collective_us >= 0, f"{prefix}.collective_us = {h.collective_us}; expected a number >= 0")
    need(h.collective_gbps > 0, f"{prefix}.collective_gbps = {h.collective_gbps}; expected a "
                                "positive number")
    need(0 <= h.cpu_attn_threads <= LIMITS["cpu_threads"],
         f"{prefix}.cpu_attn_threads = {h.cpu_attn_threads}; expected 0 (the machine's cores "
         f"minus two) or a thread count up to {LIMITS['cpu_threads']}")


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
    mc = cfg.workload.max_context
    if mc is not None and mc > max_positions:
        raise KvcError(f"workload.max_context = {mc} exceeds the model's maximum positions "
                       f"({max_positions}); use at most {max_positions}, or null for that")

"""Which HardwareConfig a config means: a preset as it is, or for `auto` this machine's
profile, measured once (kvc.profiler.measure) and cached per machine as a YAML file that the
`hardware` config group also reads.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, fields
from pathlib import Path

import torch
import yaml

from kvc.errors import KvcError
from kvc.hardware import HardwareConfig
from kvc.profiler.measure import machine_info, profile

# what the profiler measures and means by it; a cached profile of another version is measured
# again. 2: launch_us is a queued kernel's device time (was the host's issue time), mem_gbps
# is measured, attention is timed with the kernels kvc decodes with (never cuDNN)
PROFILE_VERSION = 2


def cache_path(device: str) -> Path:
    """Per machine: GPU name, driver and torch version (a driver or torch upgrade re-measures),
    and the profiler's PROFILE_VERSION (so does a profiler that measures differently)."""
    info = machine_info(device)
    key = "-".join(x for x in (info["device_name"], info["driver"], "torch" + info["torch"],
                               f"v{PROFILE_VERSION}") if x)
    slug = re.sub(r"[^A-Za-z0-9.]+", "_", key).strip("_")
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "kvc" / "hardware" / f"{slug}.yaml"


def resolve_hardware(hw: HardwareConfig, progress: bool = True) -> HardwareConfig:
    """`auto`: the cached profile of this machine (measured on first use); fields the user
    overrode (anything differing from a bare `auto`) win over the measurement. Others as is."""
    if hw.name != "auto":
        return hw
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = cache_path(device)
    if path.is_file():
        try:
            prof = read_profile_yaml(path)
        except (KvcError, OSError, yaml.YAMLError):
            prof = None  # a corrupt cache entry is re-measured, not fatal
    else:
        prof = None
    if prof is None:
        prof = profile(device, progress=progress)
        write_profile_yaml(prof, path)
    bare = HardwareConfig(name="auto")
    overrides = {f.name: getattr(hw, f.name) for f in fields(hw)
                 if f.name not in ("name", "measured") and getattr(hw, f.name) != getattr(bare, f.name)}
    return HardwareConfig(**{**asdict(prof), **overrides})


def write_profile_yaml(hw: HardwareConfig, path) -> None:
    """A flat mapping the `hardware` config group accepts; written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = hw.measured or {}
    head = (f"# kvc profile of {m.get('device_name', hw.device)} on {m.get('machine', '?')}, "
            f"{m.get('date', '?')}; torch {m.get('torch', '?')}, CUDA {m.get('cuda') or '-'}\n")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(head + yaml.safe_dump(asdict(hw), sort_keys=False))
    tmp.replace(path)


def read_profile_yaml(path) -> HardwareConfig:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise KvcError(f"{path}: expected a mapping of hardware fields")
    return HardwareConfig.from_dict(data)

"""Which HardwareConfig a config means: a preset as it is, or for `auto` this machine's
profile, measured once (kvc.profiler.measure) and cached per machine as a YAML file that the
`hardware` config group also reads.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
from dataclasses import asdict, fields
from pathlib import Path

import torch
import yaml

from kvc.config import MAX_YAML_BYTES, hardware_from_dict, load_yaml, read_text_capped
from kvc.errors import KvcError
from kvc.hardware import HardwareConfig
from kvc.profiler.measure import machine_info, profile

# what the profiler measures and means by it; a cached profile of another version is measured
# again. 2: launch_us is a queued kernel's device time (was the host's issue time), mem_gbps
# is measured, attention is timed with the kernels kvc decodes with (never cuDNN). 3: on a host
# with several GPUs, host_link_gbps (all GPUs copying at once) and collective_gbps are measured
PROFILE_VERSION = 3


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
    """A flat mapping the `hardware` config group accepts; written atomically (a temporary
    file beside it, renamed over it, removed whatever happens)."""
    path = Path(path)
    if path.is_dir():
        raise KvcError(f"{path}: is a folder; give the profile's file name, e.g. {path / 'machine.yaml'}")
    m = hw.measured or {}
    head = (f"# kvc profile of {m.get('device_name', hw.device)} on {m.get('machine', '?')}, "
            f"{m.get('date', '?')}; torch {m.get('torch', '?')}, CUDA {m.get('cuda') or '-'}\n")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        with os.fdopen(fd, "w") as f:
            f.write(head + yaml.safe_dump(asdict(hw), sort_keys=False))
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise KvcError(f"{path}: cannot write the profile ({e.strerror or e})") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def read_profile_yaml(path) -> HardwareConfig:
    """A profile written by write_profile_yaml (or by hand): size-capped, alias-free YAML
    whose fields are type- and range-checked like a config's hardware section."""
    data = load_yaml(read_text_capped(path, MAX_YAML_BYTES, "a hardware profile"), str(path)) or {}
    if not isinstance(data, dict):
        raise KvcError(f"{path}: expected a mapping of hardware fields")
    return hardware_from_dict(data, str(path))

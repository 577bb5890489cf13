"""Composition: the packaged defaults (`kvc.conf`, through Hydra), the user's model.yaml,
then override strings; any Hydra the host application had initialised is put back.

Paths: `hardware` may name a profile file instead of a preset (`hardware=hw.yaml`, a path
with a folder or a .yaml/.yml suffix; or `hardware.file=...`), as `kvc profile -o` writes it.
A relative path written in a model.yaml (model.checkpoint, a hardware file) is relative to the
model.yaml's folder (or, where nothing is there but the current folder has it, to the current
folder, which is what kvc read before); one on the command line or in a config dict is
relative to the current folder. model.checkpoint is stored absolute, so a compiled artifact
names its checkpoint wherever it is loaded from."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kvc.config.schema import (
    GROUPS,
    MAX_OVERRIDE_CHARS,
    MAX_OVERRIDES,
    MAX_YAML_BYTES,
    Config,
)
from kvc.config.validate import from_dict, hardware_from_dict
from kvc.config.yaml_safe import _plain, load_yaml, read_text_capped
from kvc.errors import KvcError


def load_config(source: str | Path | dict | None = None, overrides: list[str] | tuple = ()) -> Config:
    """A model.yaml path (or an equivalent dict, or None for the defaults) plus overrides."""
    user, where = _read_user(source)
    base = Path(source).parent if isinstance(source, (str, Path)) else None
    parsed = _parse_overrides(list(overrides))
    hw_file = _hardware_file_of_user(user, base, where)
    choices = {}
    for g in GROUPS:
        picked = user.pop(g, None) if isinstance(user.get(g), str) else None
        if isinstance(user.get(g), dict) and "preset" in user[g] and g == "hardware":
            picked = user[g].pop("preset")
        if g == "schedule" and isinstance(user.get(g), dict) and "mode" in user[g]:
            picked = user[g]["mode"]
        if picked is not None:
            choices[g] = picked
    if hw_file is not None:
        choices.pop("hardware", None)
    for o in parsed:
        key = o.key_or_group
        if key == "hardware.file" or (key == "hardware" and _names_a_file(o.value())):
            hw_file = _hardware_path(o.value(), None, f"override {o.input_line!r}")
            choices.pop("hardware", None)
            continue
        if key in GROUPS:
            choices[key] = o.value()
            if key == "hardware":
                hw_file = None  # the later choice wins
        if key == "schedule.mode":  # a mode is also the name of its schedule defaults
            choices["schedule"] = o.value()
    merged = _compose_defaults(choices)
    if hw_file is not None:
        merged["hardware"] = read_hardware_file(hw_file)
    _deep_merge(merged, user)
    for o in parsed:
        if o.key_or_group not in (*GROUPS, "hardware.file"):
            _set_dotted(merged, o.key_or_group, o.value(), o.input_line)
    from_override = any(o.key_or_group in ("model.checkpoint", "model") for o in parsed)
    _absolute_checkpoint(merged, None if from_override else base)
    return from_dict(merged, where)


def _names_a_file(value) -> bool:
    """A `hardware` value that is a path (a folder in it, or a YAML suffix), not a preset."""
    return isinstance(value, str) and ("/" in value or os.sep in value
                                       or value.endswith((".yaml", ".yml")))


def _locate(value: str, base: Path | None) -> Path:
    """A path as the user wrote it: ~ expanded; relative to `base` (a model.yaml's folder)
    when something is there or the current folder has nothing, else to the current folder."""
    p = Path(value).expanduser()
    if p.is_absolute() or base is None:
        return Path(os.path.abspath(p))
    beside = Path(os.path.abspath(base / p))
    here = Path(os.path.abspath(p))
    return here if not beside.exists() and here.exists() else beside


def _hardware_path(value, base: Path | None, what: str) -> Path:
    if not isinstance(value, str) or not value:
        raise KvcError(f"{what}: hardware.file = {value!r}; expected the path of a hardware profile "
                       "(kvc profile -o hw.yaml writes one)")
    path = _locate(value, base)
    if not path.is_file():
        raise KvcError(f"{what}: hardware profile {path} not found; `kvc profile -o {value}` writes "
                       "one, or name a preset without a path")
    return path


def _hardware_file_of_user(user: dict, base: Path | None, where: str) -> Path | None:
    """The profile a model.yaml's `hardware: path.yaml` or `hardware: {file: ...}` names
    (taken out of `user`); None where it names a preset or nothing."""
    hw = user.get("hardware")
    if isinstance(hw, str) and _names_a_file(hw):
        del user["hardware"]
        return _hardware_path(hw, base, where)
    if isinstance(hw, dict) and "file" in hw:
        if "preset" in hw:
            raise KvcError(f"{where}: hardware has both 'file' and 'preset'; give one")
        return _hardware_path(hw.pop("file"), base, where)
    return None


def read_hardware_file(path: Path) -> dict:
    """A hardware profile (what `kvc profile -o` writes, or one written by hand) as the
    hardware section: every key known, typed and in range (one line naming the file if not);
    `name` defaults to the file's stem."""
    where = str(path)
    data = load_yaml(read_text_capped(path, MAX_YAML_BYTES, "a hardware profile"), where)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise KvcError(f"{where}: expected a mapping of hardware fields (what `kvc profile -o` writes)")
    data = _plain(data, where)
    data.setdefault("name", path.stem)
    hardware_from_dict(data, where)  # refused here, naming the file, not as the config's section
    return data


def _absolute_checkpoint(merged: dict, base: Path | None) -> None:
    model = merged.get("model")
    if isinstance(model, dict) and isinstance(model.get("checkpoint"), str) and model["checkpoint"]:
        model["checkpoint"] = str(_locate(model["checkpoint"], base))


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
            also = " or a profile's path (hardware=./hw.yaml)" if g == "hardware" else ""
            raise KvcError(f"unknown {g} option {v!r}; expected one of {options}{also}")
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

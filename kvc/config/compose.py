"""Composition: the packaged defaults (`kvc.conf`, through Hydra), the user's model.yaml,
then override strings; any Hydra the host application had initialised is put back."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from kvc.config.schema import GROUPS, MAX_OVERRIDE_CHARS, MAX_OVERRIDES, MAX_YAML_BYTES, Config
from kvc.config.validate import from_dict
from kvc.config.yaml_safe import _plain, load_yaml, read_text_capped
from kvc.errors import KvcError


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

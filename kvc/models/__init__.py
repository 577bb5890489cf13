"""kvc's decoder families, by model_type: the registry every other layer asks.

Each family lives in one file (opt.py, llama.py, ...) that declares a `FAMILY` record
(kvc.models.spec.Family): its HF config mapping, weight names, presets, module and the costs
the traced graph cannot tell. Adding a family is that file, one entry in `FAMILIES` below,
and its tests (docs/ARCHITECTURE.md, "Adding a family").
"""
from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kvc.errors import KvcError
from kvc.models import gemma2, llama, opt, qwen3
from kvc.models.build import build
from kvc.models.checkpoint import checkpoint_files, read_config
from kvc.models.spec import Family, FamilyCosts, ModelSpec

FAMILIES: tuple[Family, ...] = (opt.FAMILY, llama.FAMILY, qwen3.FAMILY, gemma2.FAMILY)

_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}
_BY_NAME = {f.name: f for f in FAMILIES}
PRESETS: dict[str, ModelSpec] = {k: v for f in FAMILIES for k, v in f.presets.items()}

__all__ = ["FAMILIES", "PRESETS", "ModelSpec", "build_model", "checkpoint_files", "costs",
           "family_of", "layer_param_count", "layer_param_sizes", "param_count", "preset",
           "read_config", "spec_from_hf_config"]


def family_of(spec: ModelSpec) -> Family:
    try:
        return _BY_NAME[spec.family]
    except KeyError:
        raise KvcError(f"unsupported model family {spec.family!r}; expected one of "
                       f"{sorted(_BY_NAME)}") from None


def costs(spec: ModelSpec) -> FamilyCosts:
    return family_of(spec).costs


def preset(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise KvcError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}") from None


def spec_from_hf_config(config: dict[str, Any], where: str = "config.json") -> ModelSpec:
    """Translate a Hugging Face config.json dict into a ModelSpec (KvcError if unsupported)."""
    if not isinstance(config, dict):
        raise KvcError(f"{where}: expected a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    family = _BY_TYPE.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise KvcError(f"{where}: unsupported model_type {model_type!r}; kvc supports {sorted(_BY_TYPE)}")
    try:
        spec = family.spec_from_hf(config, model_type, where)
    except KeyError as e:
        raise KvcError(f"{where}: missing key {e.args[0]!r} needed for model_type {model_type!r}") from None
    except (TypeError, ValueError) as e:
        raise KvcError(f"{where}: a value has the wrong type for model_type {model_type!r} ({e})") from None
    check_spec(spec, where)
    return spec


def check_spec(spec: ModelSpec, where: str) -> None:
    """A model's sizes within kvc.config.LIMITS (the bounds a manifest's model_spec is held
    to): a crafted config.json cannot make kvc build or plan a model of any size."""
    from kvc.config import LIMITS

    for name, top in (("num_layers", LIMITS["num_layers"]), ("vocab_size", LIMITS["vocab_size"]),
                      ("hidden_size", LIMITS["width"]), ("intermediate_size", LIMITS["width"]),
                      ("head_dim", LIMITS["width"]), ("num_heads", LIMITS["heads"]),
                      ("num_kv_heads", LIMITS["heads"]), ("max_positions", LIMITS["max_positions"])):
        v = getattr(spec, name)
        if type(v) is not int or not 1 <= v <= top:
            raise KvcError(f"{where}: {name} = {v!r}; expected an integer 1..{top}")
    if spec.num_heads % spec.num_kv_heads:
        raise KvcError(f"{where}: {spec.num_heads} attention heads do not split into "
                       f"{spec.num_kv_heads} KV heads")


def spec_from_checkpoint(folder: str | Path) -> ModelSpec:
    return spec_from_hf_config(read_config(folder), where=str(Path(folder) / "config.json"))


def build_model(spec: ModelSpec, device: torch.device | str = "cpu",
                dtype: torch.dtype | str = torch.float16, seed: int = 0,
                checkpoint: str | Path | None = None, place=None):
    """A decoder for `spec` on `device` in `dtype`, in eval mode (kvc.models.build)."""
    return build(family_of(spec), spec, device, dtype, seed, checkpoint, place)


@functools.lru_cache(maxsize=64)
def _param_counts(key: str) -> tuple[tuple[int, ...], int]:
    spec = ModelSpec(**json.loads(key))
    with torch.device("meta"):
        model = family_of(spec).model_class(replace(spec, num_layers=1))
    layer = sorted((p.numel() for p in model.layers[0].parameters()), reverse=True)
    rest = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("layers."))
    return tuple(layer), rest


def _key(spec: ModelSpec) -> str:
    return json.dumps(spec.to_dict(), sort_keys=True)


def layer_param_sizes(spec: ModelSpec) -> list[int]:
    """The element counts of one decoder layer's parameters, in the order a weight-streamed
    layer streams them (kvc.ir.plan.streamed_prefix): read off a meta-device model."""
    return list(_param_counts(_key(spec))[0])


def layer_param_count(spec: ModelSpec) -> int:
    """One decoder layer's parameters: what a weight-streamed layer copies each step."""
    return sum(_param_counts(_key(spec))[0])


def param_count(spec: ModelSpec) -> int:
    """All parameters (a tied head counted once), from the family's own module."""
    layer, rest = _param_counts(_key(spec))
    return rest + spec.num_layers * sum(layer)

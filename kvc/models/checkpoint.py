"""Hugging Face checkpoints: config.json -> ModelSpec, weight files -> a kvc model's parameters.

Weights are read one tensor at a time and copied into parameters that already live on the
target device in the target dtype, so peak host memory is one tensor, not one model.
Pickles are only ever opened with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from kvc.errors import KvcError
from kvc.models.spec import FAMILIES, ModelSpec
from kvc.progress import bar

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# HF's config defaults where config.json leaves a key out (they differ by family)
_TIE_DEFAULT = {"opt": True, "llama": False, "mistral": False, "qwen2": False}
_EPS_DEFAULT = {"llama": 1e-6, "mistral": 1e-6, "qwen2": 1e-6}
_ROPE_TYPES = ("default", "linear", "llama3")


# --------------------------------------------------------------------------- config


def _rope(cfg: dict, where: str) -> tuple[float, dict | None]:
    # transformers 5 writes `rope_parameters` (theta inside); 4.x wrote rope_theta + rope_scaling
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise KvcError(f"{where}: rope type {kind!r} is not supported; expected one of {list(_ROPE_TYPES)}")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise KvcError(f"{where}: partial_rotary_factor != 1 is not supported")
    if kind == "default":
        return theta, None
    scaling = {"rope_type": kind, "factor": float(params["factor"])}
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            scaling[key] = float(params[key])
        # HF falls back to max_position_embeddings when the original length is not given
        scaling["original_max_position_embeddings"] = int(
            params.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings",
                                                                     cfg["max_position_embeddings"])))
    return theta, scaling


def spec_from_hf_config(config: dict[str, Any], where: str = "config.json") -> ModelSpec:
    """Translate a Hugging Face config.json dict into a ModelSpec (KvcError if unsupported)."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise KvcError(f"{where}: unsupported model_type {model_type!r}; kvc supports {sorted(FAMILIES)}")
    try:
        return _spec(config, model_type, where)
    except KeyError as e:
        raise KvcError(f"{where}: missing key {e.args[0]!r} needed for model_type {model_type!r}") from None


def _spec(cfg: dict, model_type: str, where: str) -> ModelSpec:
    extra = {k: cfg[k] for k in ("architectures", "torch_dtype", "dtype") if cfg.get(k) is not None}
    common = dict(
        model_type=model_type, vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
        num_layers=int(cfg["num_hidden_layers"]), num_heads=int(cfg["num_attention_heads"]),
        max_positions=int(cfg["max_position_embeddings"]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", _TIE_DEFAULT[model_type])), extra=extra,
    )
    if model_type == "opt":
        if cfg.get("_remove_final_layer_norm", False):
            raise KvcError(f"{where}: _remove_final_layer_norm=true is not supported")
        act = cfg.get("activation_function", "relu")
        if act not in ("relu", "gelu", "silu"):
            raise KvcError(f"{where}: activation_function {act!r} is not supported; expected relu, gelu or silu")
        return ModelSpec(
            **common, num_kv_heads=common["num_heads"], intermediate_size=int(cfg["ffn_dim"]),
            norm_eps=1e-5, do_layer_norm_before=bool(cfg.get("do_layer_norm_before", True)),
            word_embed_proj_dim=int(cfg.get("word_embed_proj_dim") or cfg["hidden_size"]),
            enable_bias=bool(cfg.get("enable_bias", True)),
            layer_norm_elementwise_affine=bool(cfg.get("layer_norm_elementwise_affine", True)),
            activation=act,
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise KvcError(f"{where}: hidden_act {act!r} is not supported; expected 'silu'")
    if cfg.get("mlp_bias", False):
        raise KvcError(f"{where}: mlp_bias=true is not supported")
    theta, scaling = _rope(cfg, where)
    if model_type == "qwen2":
        bias = True  # Qwen2 always has q/k/v biases, whatever attention_bias says
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    else:
        bias = model_type == "llama" and bool(cfg.get("attention_bias", False))
        window = cfg.get("sliding_window") if model_type == "mistral" else None
    return ModelSpec(
        **common, num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        intermediate_size=int(cfg["intermediate_size"]), head_dim=int(cfg.get("head_dim") or 0),
        norm_eps=float(cfg.get("rms_norm_eps", _EPS_DEFAULT[model_type])),
        rope_theta=theta, rope_scaling=scaling, attention_bias=bias,
        sliding_window=int(window) if window else None, activation="silu",
    )


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise KvcError(f"{path}: not found; a checkpoint folder needs a config.json") from None
    except json.JSONDecodeError as e:
        raise KvcError(f"{path}: not valid JSON ({e})") from None


# --------------------------------------------------------------------------- weight files


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The weight files of a checkpoint folder, in load order (what to hash for the artifact)."""
    folder = Path(folder)
    for index_name, single in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise KvcError(f"{index}: expected JSON with a 'weight_map' object") from None
            files = [folder / name for name in sorted(set(weight_map.values()))]
            for f in files:
                if not f.is_file():
                    raise KvcError(f"{index}: names shard {f.name!r}, which is not in {folder}")
            return files
        if (folder / single).is_file():
            return [folder / single]
    raise KvcError(f"{folder}: no weights found; expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} "
                   f"or {BIN_INDEX}")


def _reason(e: Exception) -> str:
    # torch's refusal is a long advice text; the line naming the offending global is the news
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        if "Unsupported global" in line or "WeightsUnpickler error" in line:
            return line.split(" was not an allowed global")[0].split(" Please")[0]
    return lines[0] if lines else type(e).__name__


def _tensors(path: Path) -> Iterator[tuple[str, tuple[int, ...], Any]]:
    """(name, shape, loader) for each tensor in a file; the loader reads only that tensor."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise KvcError(f"{path}: not a readable safetensors file ({e})") from None
        with handle as f:
            for name in f.keys():
                yield name, tuple(f.get_slice(name).get_shape()), (lambda n=name: f.get_tensor(n))
        return
    state = None
    for mmap in (True, False):  # mmap keeps host memory flat; legacy (non-zip) files can't
        try:
            state = torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
            break
        except Exception as e:  # refused pickle, truncated file, ...
            if mmap and "mmap" in str(e):
                continue
            raise KvcError(f"{path}: refused by torch.load(weights_only=True): {_reason(e)}; kvc "
                           f"never unpickles objects, convert the checkpoint to safetensors") from None
    if not isinstance(state, dict):
        raise KvcError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise KvcError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
        yield name, tuple(t.shape), (lambda t=t: t)


def kvc_name(hf_name: str, family: str) -> str | None:
    """HF tensor name -> kvc parameter name; None for tensors that are not weights."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None  # old Llama checkpoints stored the RoPE table; kvc recomputes it
    if hf_name == "lm_head.weight":
        return hf_name
    prefixes = ("model.decoder.", "decoder.", "model.") if family == "opt" else ("model.",)
    for p in prefixes:
        if hf_name.startswith(p):
            name = hf_name[len(p):]
            break
    else:
        return hf_name  # left as is: an unexpected-tensor error names it
    if family == "opt":
        name = name.replace(".self_attn.out_proj.", ".self_attn.o_proj.")
    return name


def to_hf_name(name: str, family: str) -> str:
    """kvc parameter name -> the name HF gives it (for error messages)."""
    if name == "lm_head.weight":
        return name
    if family == "opt":
        return "model.decoder." + name.replace(".self_attn.o_proj.", ".self_attn.out_proj.")
    return "model." + name


@torch.no_grad()
def load_checkpoint(model: nn.Module, folder: str | Path) -> nn.Module:
    """Copy a HF checkpoint's weights into `model` (built from the folder's spec), in place.

    Every parameter must come from the checkpoint exactly once with the right shape; the
    error names the tensor, the file, and the expected and actual shapes.
    """
    spec: ModelSpec = model.spec
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = spec.tie_word_embeddings
    expected = {n for n in params if not (tied and n == "lm_head.weight")}
    loaded: set[str] = set()
    with bar("kvc: loading weights", total=len(expected), unit="tensor") as counter:
        for path in checkpoint_files(folder):
            _load_file(path, spec, params, tied, loaded, counter)
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(f"{to_hf_name(n, spec.family)!r} (expected shape {list(params[n].shape)})"
                          for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise KvcError(f"{folder}: checkpoint lacks tensor {shown}{more}")
    model.tie_weights()
    model.init_buffers()
    return model


def _load_file(path: Path, spec: ModelSpec, params: dict, tied: bool, loaded: set, counter) -> None:
    for hf_name, shape, load in _tensors(path):
        name = kvc_name(hf_name, spec.family)
        if name is None or (tied and name == "lm_head.weight"):
            continue  # a tied head is the embedding; a saved copy of it adds nothing
        if name not in params:
            raise KvcError(f"{path}: unexpected tensor {hf_name!r} (no such parameter in a "
                           f"{spec.model_type} model with this config.json)")
        want = tuple(params[name].shape)
        if shape != want:
            raise KvcError(f"{path}: tensor {hf_name!r} has shape {list(shape)}, expected "
                           f"{list(want)} from config.json")
        if name in loaded:
            raise KvcError(f"{path}: tensor {hf_name!r} appears twice in the checkpoint")
        params[name].copy_(load())
        loaded.add(name)
        counter.update()

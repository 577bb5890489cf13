"""Hugging Face checkpoints: reading config.json and the weight files into a kvc model.

Which config keys mean what, and how tensors are named, is each family's own knowledge (its
Family record); this module only reads files and checks what it copies.

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
from kvc.models.spec import Family, ModelSpec, hf_token_ids
from kvc.progress import bar

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

GENERATION_CONFIG = "generation_config.json"
# what generation_config.json may set over config.json: transformers' generate() reads these
# from the generation config, which it builds from config.json only where that file is absent
GENERATION_KEYS = ("eos_token_id", "pad_token_id")
MAX_GENERATION_CONFIG_BYTES = 1 << 20


def read_config(folder: str | Path) -> dict[str, Any]:
    """config.json, with generation_config.json's eos_token_id / pad_token_id (where that file
    sets them) in place of config.json's."""
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise KvcError(f"{path}: not found; a checkpoint folder needs a config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KvcError(f"{path}: not valid JSON ({e})") from None
    if isinstance(cfg, dict):
        gen = read_generation_config(folder)
        vocab = cfg.get("vocab_size")
        if "eos_token_id" in gen and type(vocab) is int:
            try:  # its own file named: config.json's check would name config.json
                hf_token_ids(gen, "eos_token_id", vocab)
            except ValueError as e:
                raise KvcError(f"{Path(folder) / GENERATION_CONFIG}: {e}") from None
        cfg.update(gen)
    return cfg


def read_generation_config(folder: str | Path) -> dict[str, Any]:
    """The keys of GENERATION_KEYS that generation_config.json sets (not null); {} without it."""
    path = Path(folder) / GENERATION_CONFIG
    if not path.is_file():
        return {}
    try:
        if path.stat().st_size > MAX_GENERATION_CONFIG_BYTES:
            raise KvcError(f"{path}: larger than {MAX_GENERATION_CONFIG_BYTES} bytes; not a generation config")
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KvcError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise KvcError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise KvcError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return {k: data[k] for k in GENERATION_KEYS if data.get(k) is not None}


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


@torch.no_grad()
def load_checkpoint(model: nn.Module, folder: str | Path, family: Family) -> nn.Module:
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
            _load_file(path, spec, family, params, tied, loaded, counter)
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(f"{family.hf_name(n)!r} (expected shape {list(params[n].shape)})"
                          for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise KvcError(f"{folder}: checkpoint lacks tensor {shown}{more}")
    model.tie_weights()
    model.init_buffers()
    return model


def _load_file(path: Path, spec: ModelSpec, family: Family, params: dict, tied: bool, loaded: set,
               counter) -> None:
    for hf_name, shape, load in _tensors(path):
        name = family.kvc_name(hf_name)
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

"""ModelSpec: the shapes of a decoder; Family: what one family file tells the rest of kvc.

A spec is the only thing about a model that the planner sees: it plans from shapes, never
from modules. Each family file (opt.py, llama.py, ...) turns a checkpoint's config.json into
a spec, names its presets, builds its nn.Module and states what cannot be derived from the
traced graph (FamilyCosts). kvc.models (the registry) maps model_type to its family.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable


@dataclass(frozen=True)
class ModelSpec:
    model_type: str  # HF model_type: opt | llama | mistral | qwen2 | ...
    family: str  # the family file that builds it (kvc.models registry)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_positions: int
    head_dim: int = 0  # 0 -> hidden_size // num_heads
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    # llama family
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    attention_bias: bool = False  # qkv bias (qwen2)
    # sliding-window attention: the new token attends to the last `sliding_window` positions
    # (itself included) in the layers `window_layers` names (empty: every layer)
    sliding_window: int | None = None
    window_layers: tuple[int, ...] = ()
    # opt
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int = 0  # 0 -> hidden_size
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation: str = "silu"  # opt: relu
    # family-specific settings only the family's own file reads (e.g. soft-capping)
    options: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # unused HF keys kept for the manifest, never read
    # the checkpoint's end-of-sequence ids (generation_config.json's, else config.json's; one
    # or several, empty: none) and its padding id: the defaults text generation stops / pads with
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if not isinstance(self.eos_token_id, tuple):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        for v in (*self.eos_token_id, *(() if self.pad_token_id is None else (self.pad_token_id,))):
            if type(v) is not int or not 0 <= v < self.vocab_size:
                raise ValueError(f"token id {v!r} (eos_token_id {list(self.eos_token_id)}, pad_token_id "
                                 f"{self.pad_token_id!r}) is not an integer 0..{self.vocab_size - 1}")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.word_embed_proj_dim == 0:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)

    @property
    def kv_width(self) -> int:
        """h_kv = n_kv_heads * head_dim: the width of K (and of V) per token."""
        return self.num_kv_heads * self.head_dim

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    def window(self, layer: int) -> int | None:
        """The attention window of decoder layer `layer`, None where it attends to everything."""
        if self.sliding_window is None or (self.window_layers and layer not in self.window_layers):
            return None
        return self.sliding_window

    def cached_tokens(self, layer: int, s: int) -> int:
        """How many of the s cached tokens a decode step of `layer` attends to: the rows
        [s - n, s) (its window holds the new token too). What the layer's cache reads,
        streams and recomputes; the planner prices exactly these."""
        w = self.window(layer)
        return s if w is None else max(0, min(s, w - 1))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists): what a manifest stores and `from_dict` reads back.
        A spec without EOS / pad ids leaves those keys out, so it is the dict that manifests
        written before the fields existed hold (kvc.load compares the two)."""
        d = json.loads(json.dumps(asdict(self)))
        for key, none in (("eos_token_id", []), ("pad_token_id", None)):
            if d[key] == none:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        d = dict(d)
        d["window_layers"] = tuple(d.get("window_layers", ()))
        if not isinstance(d.get("eos_token_id", ()), (list, tuple)):
            raise TypeError(f"eos_token_id = {str(d['eos_token_id'])[:40]}; expected a list of token ids")
        d["eos_token_id"] = tuple(d.get("eos_token_id", ()))
        return cls(**d)


def with_overrides(spec: ModelSpec, **changes) -> ModelSpec:
    return replace(spec, **changes)


def hf_int(cfg: dict, key: str) -> int:
    """An integer field of config.json: a JSON integer (or a float with no fraction), never a
    string, a bool or 64.5 silently truncated (TypeError: the registry's one line)."""
    v = cfg[key]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if type(v) is not int:
        raise TypeError(f"{key} = {v!r}, expected an integer")
    return v


def hf_token_ids(cfg: dict, key: str, vocab_size: int) -> tuple[int, ...]:
    """config.json's `eos_token_id` (or `pad_token_id`): absent or null -> (), an integer or a
    list of integers -> a tuple, each a token id 0..vocab_size-1 (ValueError otherwise)."""
    v = cfg.get(key)
    if v is None:
        return ()
    ids = v if isinstance(v, list) else [v]
    out = []
    for i in ids:
        if isinstance(i, float) and i.is_integer():
            i = int(i)
        if type(i) is not int or not 0 <= i < vocab_size:
            raise ValueError(f"{key} = {str(v)[:80]}; expected a token id 0..{vocab_size - 1} "
                             "(an integer, or a list of them)")
        out.append(i)
    return tuple(dict.fromkeys(out))  # order kept, repeats dropped


def hf_common(cfg: dict, model_type: str, family: str, tie_default: bool) -> dict:
    """The ModelSpec fields every decoder's config.json spells the same way (the EOS and pad
    ids included: kvc.models.checkpoint.read_config has put generation_config.json's over
    config.json's)."""
    extra = {k: cfg[k] for k in ("architectures", "torch_dtype", "dtype") if cfg.get(k) is not None}
    vocab = hf_int(cfg, "vocab_size")
    pad = cfg.get("pad_token_id")
    # a pad id outside the vocabulary (old Llama configs say -1) means "none": it must never
    # reach the embedding, and transformers pads with EOS then
    pad_ids = hf_token_ids(cfg, "pad_token_id", vocab) if type(pad) is int and 0 <= pad < vocab else ()
    return dict(
        model_type=model_type, family=family, vocab_size=vocab,
        hidden_size=hf_int(cfg, "hidden_size"), num_layers=hf_int(cfg, "num_hidden_layers"),
        num_heads=hf_int(cfg, "num_attention_heads"),
        max_positions=hf_int(cfg, "max_position_embeddings"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", tie_default)), extra=extra,
        eos_token_id=hf_token_ids(cfg, "eos_token_id", vocab),
        pad_token_id=pad_ids[0] if pad_ids else None)


@dataclass(frozen=True)
class FamilyCosts:
    """Per-step costs of a family that the traced graph cannot tell the planner: measured on
    the GPU (calibration history: docs/CALIBRATION.md)."""

    layer_ops: int  # small kernels one decoder layer runs for the new token (not GEMMs/attention)
    recompute_ops: int  # kernels per recompute chunk (K GEMM, V GEMM, cache writes, RoPE)
    elementwise_passes: float  # memory passes over one of K or V per recomputed token
    host_op_weight: float  # an aten op of this family's graph, in units of hardware.host_op_us


@dataclass(frozen=True)
class Family:
    """Everything kvc knows about one family, declared in the family's own file."""

    name: str
    model_types: tuple[str, ...]  # the HF model_type values it builds
    model_class: type  # nn.Module(spec) keeping the forward contract (kvc/models/llama.py)
    spec_from_hf: Callable[[dict, str, str], ModelSpec]  # (config.json, model_type, where)
    hf_prefixes: tuple[str, ...]  # stripped from HF tensor names, first match
    hf_renames: tuple[tuple[str, str], ...]  # then these HF -> kvc name fragments replaced
    presets: dict[str, ModelSpec]
    costs: FamilyCosts

    def kvc_name(self, hf_name: str) -> str | None:
        """HF tensor name -> kvc parameter name; None for tensors that are not weights."""
        if hf_name.endswith("rotary_emb.inv_freq"):
            return None  # old checkpoints stored the RoPE table; kvc recomputes it
        if hf_name == "lm_head.weight":
            return hf_name
        for p in self.hf_prefixes:
            if hf_name.startswith(p):
                name = hf_name[len(p):]
                break
        else:
            return hf_name  # left as is: an unexpected-tensor error names it
        for hf, ours in self.hf_renames:
            name = name.replace(hf, ours)
        return name

    def hf_name(self, name: str) -> str:
        """kvc parameter name -> the name HF gives it (for error messages)."""
        if name == "lm_head.weight":
            return name
        for hf, ours in self.hf_renames:
            name = name.replace(ours, hf)
        return self.hf_prefixes[0] + name

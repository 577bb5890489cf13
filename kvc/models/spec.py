"""ModelSpec: the shapes of a decoder, family-agnostic, with named presets.

This is the only thing about a model that the cost model and the scheduler see: they plan
from shapes, never from modules. The model builders in this package turn a spec into an
nn.Module, and `from_hf_config` turns a checkpoint's config.json into a spec.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from kvc.errors import KvcError

FAMILIES = {"opt": "opt", "llama": "llama", "mistral": "llama", "qwen2": "llama"}



@dataclass(frozen=True)
class ModelSpec:
    model_type: str  # HF model_type: opt | llama | mistral | qwen2
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
    sliding_window: int | None = None  # mistral: kvc keeps contexts within it (see config validation)
    # opt
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int = 0  # 0 -> hidden_size
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation: str = "silu"  # opt: relu
    extra: dict = field(default_factory=dict)  # unused HF keys kept for the manifest, never read

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise KvcError(
                f"unsupported model_type {self.model_type!r}; expected one of {sorted(FAMILIES)}"
            )
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.word_embed_proj_dim == 0:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)

    @property
    def family(self) -> str:
        return FAMILIES[self.model_type]

    @property
    def kv_width(self) -> int:
        """h_kv = n_kv_heads * head_dim: the width of K (and of V) per token."""
        return self.num_kv_heads * self.head_dim

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    def layer_param_count(self) -> int:
        h, hq, hkv, f = self.hidden_size, self.q_width, self.kv_width, self.intermediate_size
        if self.family == "opt":
            attn = h * hq * 2 + h * hkv * 2 + (hq * 2 + hkv * 2 if self.enable_bias else 0)
            mlp = 2 * h * f + (f + h if self.enable_bias else 0)
            return attn + mlp + 4 * h
        attn = h * hq * 2 + h * hkv * 2 + ((hq + 2 * hkv) if self.attention_bias else 0)
        return attn + 3 * h * f + 2 * h

    def param_count(self) -> int:
        emb = self.vocab_size * self.word_embed_proj_dim
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.word_embed_proj_dim
        rest = 2 * self.hidden_size
        if self.family == "opt":
            rest += (self.max_positions + 2) * self.hidden_size
            if self.word_embed_proj_dim != self.hidden_size:
                rest += 2 * self.hidden_size * self.word_embed_proj_dim
        return emb + head + rest + self.num_layers * self.layer_param_count()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _opt(h, layers, heads, vocab=50272, **kw) -> ModelSpec:
    return ModelSpec(
        model_type="opt", vocab_size=vocab, hidden_size=h, num_layers=layers, num_heads=heads,
        num_kv_heads=heads, intermediate_size=4 * h, max_positions=2048,
        tie_word_embeddings=True, activation="relu", norm_eps=1e-5, **kw,
    )


def _llama(model_type, h, layers, heads, kv_heads, ffn, vocab, max_pos, theta, eps=1e-5, **kw):
    return ModelSpec(
        model_type=model_type, vocab_size=vocab, hidden_size=h, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, intermediate_size=ffn, max_positions=max_pos,
        rope_theta=theta, norm_eps=eps, activation="silu", **kw,
    )


PRESETS: dict[str, ModelSpec] = {
    "opt-125m": _opt(768, 12, 12),
    "opt-350m": _opt(1024, 24, 16, do_layer_norm_before=False, word_embed_proj_dim=512),
    "opt-1.3b": _opt(2048, 24, 32),
    "opt-2.7b": _opt(2560, 32, 32),
    "opt-6.7b": _opt(4096, 32, 32),
    "opt-13b": _opt(5120, 40, 40),
    "opt-30b": _opt(7168, 48, 56),
    "opt-66b": _opt(9216, 64, 72),
    "llama-2-7b": _llama("llama", 4096, 32, 32, 32, 11008, 32000, 4096, 10000.0),
    "llama-2-13b": _llama("llama", 5120, 40, 40, 40, 13824, 32000, 4096, 10000.0),
    "llama-2-70b": _llama("llama", 8192, 80, 64, 8, 28672, 32000, 4096, 10000.0),
    "llama-3-8b": _llama("llama", 4096, 32, 32, 8, 14336, 128256, 8192, 500000.0),
    "mistral-7b": _llama("mistral", 4096, 32, 32, 8, 14336, 32000, 32768, 10000.0,
                         sliding_window=4096),
    "qwen2-7b": _llama("qwen2", 3584, 28, 28, 4, 18944, 152064, 32768, 1000000.0, eps=1e-6,
                       attention_bias=True),
    # tiny shapes for tests, examples and CI: real code paths, seconds on a CPU
    "tiny-opt": _opt(64, 2, 4, vocab=512),
    "tiny-llama": _llama("llama", 64, 2, 4, 4, 160, 512, 512, 10000.0),
    "tiny-llama-gqa": _llama("llama", 64, 2, 4, 2, 160, 512, 512, 10000.0),
}


def preset(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise KvcError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}") from None


def with_overrides(spec: ModelSpec, **changes) -> ModelSpec:
    return replace(spec, **changes)

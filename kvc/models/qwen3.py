"""The Qwen3 family (dense Qwen3, 0.6B to 32B): Llama's decoder plus a per-head RMSNorm on q and k.

Same math as kvc/models/llama.py (RMSNorm, SwiGLU, RoPE, grouped-query attention), whose parts
it imports, with:
- `q_norm` / `k_norm`: RMSNorm(head_dim) on q and k after the head split and before RoPE, in
  HF's Qwen3Attention order (normalise in float32, cast back, then scale);
- an explicit `head_dim`, often not hidden_size / num_heads (Qwen3-0.6B: 1024 / 16 heads, 128);
- no biases anywhere (attention_bias=true is refused); embeddings tied or not, per config;
- no sliding window: use_sliding_window=true is refused (false in every released dense Qwen3).

The forward contract is llama.py's. The K path to kv_write is k_proj -> unflatten -> k_norm ->
RoPE: it reads the attention input, cos/sin (from positions) and weights only, so the
compiler's recompute clone rebuilds the normalised, rotated K from a staged activation.
"""
from __future__ import annotations

import kvc.ir.ops  # noqa: F401  (registers torch.ops.kvc.*)
from kvc.errors import KvcError
from kvc.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    RMSNorm,
    rope_from_hf,
)
from kvc.models.spec import Family, FamilyCosts, ModelSpec, hf_common


class Qwen3Attention(LlamaAttention):
    """LlamaAttention (its forward: projections without biases, RoPE, attention) with q_norm /
    k_norm applied to the heads before RoPE, as HF's Qwen3Attention does."""

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.q_norm = RMSNorm(spec.head_dim, spec.norm_eps)
        self.k_norm = RMSNorm(spec.head_dim, spec.norm_eps)

    def q_heads(self, x):
        return self.q_norm(super().q_heads(x))

    def k_heads(self, x):
        return self.k_norm(super().k_heads(x))


class Qwen3DecoderLayer(LlamaDecoderLayer):
    """Llama's pre-norm layer (its forward), with Qwen3Attention in place of LlamaAttention
    (the family builds on the meta device: the replaced module costs nothing)."""

    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__(spec, layer)
        self.self_attn = Qwen3Attention(spec)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Llama's embedding, RoPE tables, final norm, head and forward, with Qwen3's layers;
    attention biases and sliding windows are refused (no released dense Qwen3 has them)."""

    family = "qwen3"
    layer_class = Qwen3DecoderLayer

    def __init__(self, spec: ModelSpec):
        if spec.attention_bias or spec.sliding_window is not None:
            raise ValueError("qwen3: attention biases and sliding windows are not supported")
        super().__init__(spec)


# --- what the rest of kvc knows about the Qwen3 family (the registry reads FAMILY) ------------

def spec_from_hf(cfg: dict, model_type: str, where: str) -> ModelSpec:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise KvcError(f"{where}: hidden_act {act!r} is not supported; expected 'silu'")
    if cfg.get("attention_bias", False):
        raise KvcError(f"{where}: attention_bias=true is not supported for qwen3")
    if cfg.get("use_sliding_window", False):
        raise KvcError(f"{where}: use_sliding_window=true is not supported for qwen3")
    theta, scaling = rope_from_hf(cfg, where)
    common = hf_common(cfg, model_type, "qwen3", tie_default=False)
    # HF's Qwen3Config defaults head_dim to 128 when config.json leaves it out
    head_dim = cfg.get("head_dim", 128)
    return ModelSpec(
        **common, num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        intermediate_size=int(cfg["intermediate_size"]), head_dim=int(head_dim or 0),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        attention_bias=False, sliding_window=None, activation="silu",
    )


def _qwen3(h, layers, heads, kv_heads, ffn, tied, vocab=151936, max_pos=40960, head_dim=128,
           theta=1000000.0) -> ModelSpec:
    return ModelSpec(
        model_type="qwen3", family="qwen3", vocab_size=vocab, hidden_size=h, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, intermediate_size=ffn, max_positions=max_pos,
        head_dim=head_dim, norm_eps=1e-6, tie_word_embeddings=tied, rope_theta=theta,
        activation="silu",
    )


FAMILY = Family(
    name="qwen3", model_types=("qwen3",), model_class=Qwen3ForCausalLM,
    spec_from_hf=spec_from_hf, hf_prefixes=("model.",), hf_renames=(),
    presets={  # the released dense checkpoints' config.json
        "qwen3-0.6b": _qwen3(1024, 28, 16, 8, 3072, tied=True),
        "qwen3-1.7b": _qwen3(2048, 28, 16, 8, 6144, tied=True),
        "qwen3-4b": _qwen3(2560, 36, 32, 8, 9728, tied=True),
        "qwen3-8b": _qwen3(4096, 36, 32, 8, 12288, tied=False),
        "qwen3-14b": _qwen3(5120, 40, 40, 8, 17408, tied=False),
        "qwen3-32b": _qwen3(5120, 64, 64, 8, 25600, tied=False),
        # tests, examples and CI: head_dim 32 != 64 / 4 heads, as the real ones differ
        "tiny-qwen3": _qwen3(64, 2, 4, 2, 160, tied=True, vocab=512, max_pos=512, head_dim=32),
    },
    # ESTIMATES, not yet profiled on a GPU: llama's H200 values plus the two fp32 RMSNorms
    # over q and k (about 8 more small kernels per layer), one more kernel per recompute
    # chunk, and about 6 more memory passes over recomputed K for its k_norm
    costs=FamilyCosts(layer_ops=40, recompute_ops=6, elementwise_passes=28, host_op_weight=1.9),
)

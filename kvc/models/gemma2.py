"""The Gemma 2 family (2B, 9B, 27B): a Llama-shaped decoder with Gemma's own numerics.

As transformers' modeling_gemma2, step for step (so fp32 matches it within rounding, and the
half-precision roundings happen where HF's do):
- embeddings scaled by sqrt(hidden_size), the scale rounded to the activation dtype first;
- RMSNorm `x_f32 * rsqrt(mean(x_f32^2) + eps) * (1 + w_f32)`, cast back at the end (Llama
  casts before the scale); four per layer: input, post_attention (on the attention output,
  before the residual add), pre_feedforward, post_feedforward (likewise for the MLP);
- GeGLU MLP, gelu with approximate="tanh" (HF's gelu_pytorch_tanh);
- attention scores `q k^T * query_pre_attn_scalar**-0.5`, soft-capped `tanh(x / cap) * cap`,
  then masked, softmax in float32, cast back, times V. The soft-cap sits between the product
  and the softmax, so attention is computed explicitly in prefill and decode (no SDPA);
- final logits soft-capped the same way;
- layers alternate between a sliding window and global attention (HF layer_types; configs
  without it: even layers slide). spec.sliding_window and spec.window_layers carry that, so
  the runtime's caches read, stream and recompute only a windowed layer's window, and prefill
  masks it with llama.causal_mask;
- tied embeddings and an explicit head_dim, as Gemma 2's checkpoints have them.

The forward contract is llama.py's; RoPE (tables and the half-at-a-time rotation) is Llama's.
Family-only scalars live in spec.options: query_pre_attn_scalar, attn_logit_softcapping,
final_logit_softcapping (None: no cap).
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import kvc.ir.ops  # noqa: F401  (registers torch.ops.kvc.*)
from kvc.errors import KvcError
from kvc.models.attend import mask_scores, softmax_attend
from kvc.models.llama import (
    LlamaAttention,
    RMSNorm,
    causal_mask,
    rope_from_hf,
    rope_inv_freq,
    rope_tables,
)
from kvc.models.spec import Family, FamilyCosts, ModelSpec, hf_common

# leaves of the traced graph: they pick the mask, and merge the CPU lane's part, when the step runs
torch.fx.wrap("mask_scores")
torch.fx.wrap("softmax_attend")


class GemmaRMSNorm(RMSNorm):
    """Scales by (1 + weight), in float32, and casts back last (HF's Gemma2RMSNorm)."""

    def __init__(self, width: int, eps: float):
        super().__init__(width, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x):
        return (self.normalized(x) * (1.0 + self.weight.float())).type_as(x)


def soft_cap(x, cap: float | None):
    """tanh(x / cap) * cap, in HF's order; None: x as it is."""
    return x if cap is None else torch.tanh(x / cap) * cap


class Gemma2Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, bias = spec.hidden_size, spec.attention_bias
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.groups = spec.num_heads // spec.num_kv_heads
        self.scaling = float(spec.options["query_pre_attn_scalar"]) ** -0.5
        self.softcap = spec.options.get("attn_logit_softcapping")
        self.q_proj = nn.Linear(h, spec.q_width, bias=bias)
        self.k_proj = nn.Linear(h, spec.kv_width, bias=bias)
        self.v_proj = nn.Linear(h, spec.kv_width, bias=bias)
        self.o_proj = nn.Linear(spec.q_width, h, bias=bias)

    _rope = LlamaAttention._rope  # RoPE a half at a time, rounded as HF's (reads self.head_dim)

    def forward(self, x, cos, sin, rt, layer: int, prefill: bool, mask=None):
        """`mask` (prefill): [T, T] bool, True where a query may attend (causal, and for a
        windowed layer within its window)."""
        k = self._rope(self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim)), cos, sin)
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        torch.ops.kvc.kv_write(k, v, rt, layer)
        q = self._rope(self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)), cos, sin)
        unit = None
        if prefill:
            k_all, v_all = k.transpose(1, 2), v.transpose(1, 2)  # [b, n_kv, T, hd]
        else:
            # the CPU lane (if the plan gives this unit one) starts on the oldest rows now
            unit = torch.ops.kvc.cpu_attn_begin(q.transpose(1, 2), rt, layer, self.scaling,
                                                float(self.softcap or 0.0))
            kv = torch.ops.kvc.kv_read(rt, layer)  # the rows attended to, this step's included
            k_all, v_all = kv[0].transpose(1, 2), kv[1].transpose(1, 2)
        # the query heads sharing a KV head become extra query rows: [b, n_kv, g*T, hd], so
        # K,V are never repeated; the products are the same dot products as HF's repeat_kv
        qg = q.transpose(1, 2).unflatten(1, (self.num_kv_heads, self.groups)).flatten(2, 3)
        scores = soft_cap(torch.matmul(qg, k_all.transpose(2, 3)) * self.scaling, self.softcap)
        # the batch's padding mask (kv_mask, empty without padding), else prefill's `mask`
        scores = mask_scores(scores, torch.ops.kvc.kv_mask(rt, layer), mask, self.groups)
        out = softmax_attend(scores, v_all, rt, unit)  # [b, n_kv, g*T, hd], the CPU's part merged
        out = out.unflatten(2, (self.groups, -1)).flatten(1, 2)  # [b, H, T, hd]
        return self.o_proj(out.transpose(1, 2).flatten(-2))


class Gemma2MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.layer = layer
        self.window = spec.window(layer)  # its sliding window, None: global attention
        h, eps = spec.hidden_size, spec.norm_eps
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.self_attn = Gemma2Attention(spec)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.mlp = Gemma2MLP(spec)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(self, x, cos, sin, rt, prefill: bool, mask=None):
        a = self.self_attn(self.input_layernorm(x), cos, sin, rt, self.layer, prefill, mask)
        x = x + self.post_attention_layernorm(a)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2ForCausalLM(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.family != "gemma2":
            raise ValueError(f"Gemma2ForCausalLM needs a gemma2-family spec, got {spec.model_type!r}")
        if spec.num_heads % spec.num_kv_heads:
            raise ValueError(f"num_heads {spec.num_heads} is not a multiple of num_kv_heads {spec.num_kv_heads}")
        self.spec = spec
        self.final_softcap = spec.options.get("final_logit_softcapping")
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList([Gemma2DecoderLayer(spec, i) for i in range(spec.num_layers)])
        self.norm = GemmaRMSNorm(spec.hidden_size, spec.norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        # not persistent: HF checkpoints do not carry them. RoPE tables in float32 (init_buffers);
        # the embedding scale in the weights' dtype, as HF rounds it (sqrt(3072) -> 55.5 in bf16)
        self.register_buffer("inv_freq", rope_inv_freq(spec), persistent=False)
        cos, sin = rope_tables(spec, self.inv_freq)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("embed_scale", torch.tensor(spec.hidden_size ** 0.5), persistent=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share lm_head with the embedding when the spec says so (again after to_empty/load)."""
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_buffers(self) -> None:
        """(Re)compute the buffers on the weights' device: RoPE in float32, the embedding
        scale computed in float32 and rounded to the weights' dtype (HF's order)."""
        w = self.embed_tokens.weight
        if w.device.type != "meta":
            self.inv_freq = rope_inv_freq(self.spec, device=w.device)
            self.rope_cos, self.rope_sin = rope_tables(self.spec, self.inv_freq)
            self.embed_scale = torch.tensor(self.spec.hidden_size ** 0.5, device=w.device).to(w.dtype)

    def forward(self, input_ids, positions, rt: int, prefill: bool = False,
                last_only: bool = False):
        w = self.embed_tokens.weight
        x = self.embed_tokens(input_ids) * self.embed_scale.to(w.dtype)
        # as llama.py: cos/sin from the tables, in the weights' dtype, independent of input_ids
        cos = self.rope_cos[positions].type_as(w)
        sin = self.rope_sin[positions].type_as(w)
        # prefill masks: causal for global layers, causal within the window for sliding ones
        # (decode needs none: kv_read returns a windowed layer's window only)
        masks = {}
        if prefill:
            masks = {None: causal_mask(positions)}
            if self.spec.sliding_window is not None:
                masks[self.spec.sliding_window] = causal_mask(positions, self.spec.sliding_window)
        for layer in self.layers:
            x = layer(x, cos, sin, rt, prefill, masks.get(layer.window))
        if last_only:
            x = x[:, -1:]
        return soft_cap(self.lm_head(self.norm(x)), self.final_softcap)


# --- what the rest of kvc knows about Gemma 2 (the registry reads FAMILY) ---------------------

def spec_from_hf(cfg: dict, model_type: str, where: str) -> ModelSpec:
    # HF's Gemma2Config defaults stand in for keys a config.json leaves out
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise KvcError(f"{where}: hidden_activation {act!r} is not supported; expected 'gelu_pytorch_tanh'")
    if cfg.get("use_bidirectional_attention"):
        raise KvcError(f"{where}: use_bidirectional_attention=true is not supported (kvc decodes causally)")
    theta, scaling = rope_from_hf(cfg, where)
    common = hf_common(cfg, model_type, "gemma2", tie_default=True)
    layers = common["num_layers"]
    window = cfg.get("sliding_window", 4096)
    types = cfg.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                       for i in range(layers)]
    if len(types) != layers:
        raise KvcError(f"{where}: layer_types names {len(types)} layers, num_hidden_layers is {layers}")
    window_layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if not window or not window_layers:  # no window, or no layer slides: none is windowed
        window, window_layers = None, ()

    def cap(key, default):
        v = cfg.get(key, default)
        return float(v) if v else None

    return ModelSpec(
        **common, num_kv_heads=int(cfg.get("num_key_value_heads") or common["num_heads"]),
        intermediate_size=int(cfg["intermediate_size"]), head_dim=int(cfg.get("head_dim") or 256),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        attention_bias=bool(cfg.get("attention_bias", False)),
        sliding_window=int(window) if window else None, window_layers=window_layers,
        activation="gelu_pytorch_tanh",
        options={"query_pre_attn_scalar": float(cfg.get("query_pre_attn_scalar", 256)),
                 "attn_logit_softcapping": cap("attn_logit_softcapping", 50.0),
                 "final_logit_softcapping": cap("final_logit_softcapping", 30.0)},
    )


def _gemma2(h, layers, heads, kv_heads, ffn, head_dim, query_scalar, vocab=256000,
            max_pos=8192, window=4096) -> ModelSpec:
    return ModelSpec(
        model_type="gemma2", family="gemma2", vocab_size=vocab, hidden_size=h, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, intermediate_size=ffn, max_positions=max_pos,
        head_dim=head_dim, norm_eps=1e-6, tie_word_embeddings=True, rope_theta=10000.0,
        sliding_window=window, window_layers=tuple(range(0, layers, 2)),
        activation="gelu_pytorch_tanh",
        options={"query_pre_attn_scalar": float(query_scalar), "attn_logit_softcapping": 50.0,
                 "final_logit_softcapping": 30.0},
    )


FAMILY = Family(
    name="gemma2", model_types=("gemma2",), model_class=Gemma2ForCausalLM,
    spec_from_hf=spec_from_hf, hf_prefixes=("model.",), hf_renames=(),
    presets={  # the released checkpoints' config.json
        "gemma-2-2b": _gemma2(2304, 26, 8, 4, 9216, 256, 256),
        "gemma-2-9b": _gemma2(3584, 42, 16, 8, 14336, 256, 256),
        "gemma-2-27b": _gemma2(4608, 46, 32, 16, 36864, 128, 144),
        # tiny shapes for tests, examples and CI: windowed and global layers, GQA, soft-caps
        "tiny-gemma2": _gemma2(64, 4, 4, 2, 160, 16, 16, vocab=512, max_pos=512, window=8),
    },
    # ESTIMATES, not yet profiled on a GPU: Llama's costs plus what Gemma 2 adds per layer, two
    # more fp32 RMSNorms (~7 small kernels each) and attention spelled out (scale, soft-cap's
    # div/tanh/mul, softmax, casts: ~8 kernels where Llama runs one SDPA); its K,V path is
    # Llama's (projections and RoPE), so recompute costs the same
    costs=FamilyCosts(layer_ops=54, recompute_ops=5, elementwise_passes=22, host_op_weight=1.9),
)

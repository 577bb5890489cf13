"""The Llama family: Llama 2/3, Mistral, Qwen2 (same math, different defaults and biases).

RMSNorm, SwiGLU, RoPE (with rope_theta and the "llama3" / "linear" scalings), grouped-query
attention. Qwen2 adds q/k/v biases; Llama's `attention_bias` also puts one on o_proj.
Sliding windows (Mistral; Qwen2 with use_sliding_window, from layer max_window_layers on): a
windowed layer's prefill attends through `causal_mask(positions, W)`, and its decode step
through what kv_read returns, which is the window only (the runtime's caches read rows
[s - min(s, W-1), s+T), ModelSpec.cached_tokens).
Other families reuse its parts (RMSNorm, RoPE tables, `rope_from_hf`).

The forward contract every family keeps (the compiler depends on it):

    forward(input_ids[b, T], positions[T] or [b, T], rt, prefill=False, last_only=False) -> logits

- `positions` are the absolute positions of the T tokens: [T] when every row has the same
  length, [b, T] per row for a left-padded batch (a row's positions start at its first real
  token; its padding is masked by what `kv_mask(rt, i)` returns, kvc/models/attend.py).
- Each layer writes the NEW tokens' K,V with `torch.ops.kvc.kv_write(k, v, rt, i)`, layout
  [b, T, n_kv, hd], RoPE applied. Decode reads the cached rows with `kv_read(rt, i)`
  (indexed, never tuple-unpacked, so it traces; this step's rows included, and for a layer
  with a sliding window only the window's rows), and attends through kvc.models.attend with
  `kv_mask(rt, i)`: no mask unless the batch is padded.
- No Python control flow on tensor values or shapes, so `torch.fx.symbolic_trace` works with
  `concrete_args={"prefill": ..., "last_only": ...}`. cos/sin are computed once from
  `positions` at the top and handed to the layers, so the path from a layer's attention
  input to its kv_write reads only that input, positions-derived nodes and weights: the
  compiler clones that path to recompute K,V for any token range.
"""
from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import kvc.ir.ops  # noqa: F401  (registers torch.ops.kvc.*)
from kvc.errors import KvcError
from kvc.models.attend import attend
from kvc.models.spec import Family, FamilyCosts, ModelSpec, hf_common

torch.fx.wrap("attend")  # a leaf of the traced graph: it picks the mask when the step runs


def rope_inv_freq(spec: ModelSpec, device=None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], float32, computed exactly as HF does (incl. llama3)."""
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (
        torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
    scaling = spec.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r}")
    # HF's _compute_llama3_parameters, step for step, so the float32 rounding agrees
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def normalized(self, x):
        """x / rms(x) in float32 (the part every RMSNorm shares; families scale differently)."""
        xf = x.float()
        return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        # HF normalises in float32, casts back, then scales: keep that order for parity
        return self.weight * self.normalized(x).type_as(x)


def causal_mask(positions: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """[T, T] bool ([b, T, T] for per-row positions [b, T]), True where query q may attend to key k: k <= q, and with a sliding
    window q - k < window (HF's sliding_window_overlay: each query sees `window` positions,
    itself included). Built from positions, so it traces and depends on no token."""
    d = positions[..., :, None] - positions[..., None, :]
    allowed = d >= 0
    if window is not None:
        allowed = allowed & (d < window)
    return allowed


class LlamaAttention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        h = spec.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.groups = spec.num_heads // spec.num_kv_heads
        self.q_proj = nn.Linear(h, spec.q_width, bias=spec.attention_bias)
        self.k_proj = nn.Linear(h, spec.kv_width, bias=spec.attention_bias)
        self.v_proj = nn.Linear(h, spec.kv_width, bias=spec.attention_bias)
        # Llama's attention_bias covers o_proj too; Qwen2's covers only q/k/v
        self.o_proj = nn.Linear(spec.q_width, h, bias=spec.attention_bias and spec.model_type == "llama")

    def _rope(self, x, cos, sin):
        """HF's `x * cos + rotate_half(x) * sin`, computed a half at a time and rounded the
        same, bit for bit: rotate_half's negation is exact, so HF's first half is
        round(round(x1*c) - round(x2*s)) and its second round(round(x2*c) + round(x1*s)),
        where c, s are the tables' first halves (their two halves are equal: rope_tables'
        cat((freqs, freqs)), as HF's). No full-width rotated copy: on recomputed K that is a
        third fewer passes (tools/rope_bench.py, H200: 16.4 against 24.4 passes over K).
        x [b, T, heads, hd]; cos/sin [T, hd] (or [b, T, hd]: a left-padded batch's per-row
        positions) broadcast over batch and heads."""
        half = self.head_dim // 2
        x1, x2 = x[..., :half], x[..., half:]
        c, s = cos[..., None, :half], sin[..., None, :half]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    def q_heads(self, x):
        """Q as heads [b, T, H, hd], before RoPE (a family may normalise it here: Qwen3)."""
        return self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))

    def k_heads(self, x):
        """K as heads [b, T, n_kv, hd], before RoPE; on the path the compiler clones to
        recompute K, so it may read only x and weights."""
        return self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))

    def forward(self, x, cos, sin, rt, layer: int, prefill: bool, mask=None):
        """`mask`: prefill's sliding causal mask (windowed layers only); None: causal."""
        k = self._rope(self.k_heads(x), cos, sin)
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        torch.ops.kvc.kv_write(k, v, rt, layer)
        q = self._rope(self.q_heads(x), cos, sin).transpose(1, 2)  # [b, H, T, hd]
        unit = None
        if prefill:
            k_all, v_all = k.transpose(1, 2), v.transpose(1, 2)
        else:
            # the CPU lane (if the plan gives this unit one) starts on the oldest rows now
            unit = torch.ops.kvc.cpu_attn_begin(q, rt, layer, self.head_dim ** -0.5, 0.0)
            kv = torch.ops.kvc.kv_read(rt, layer)  # tokens [lo, s+T): this step's included
            k_all, v_all = kv[0].transpose(1, 2), kv[1].transpose(1, 2)  # [b, n_kv, S, hd]
        # kv_mask: the batch's padding mask for these rows (empty: no padding; kvc.models.attend)
        out = attend(q, k_all, v_all, torch.ops.kvc.kv_mask(rt, layer), mask, prefill, self.groups,
                     None, rt, unit)
        return self.o_proj(out.transpose(1, 2).flatten(-2))


class LlamaMLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.layer = layer
        self.window = spec.window(layer)  # its sliding window, None: it attends to every token
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.norm_eps)
        self.self_attn = LlamaAttention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.norm_eps)
        self.mlp = LlamaMLP(spec)

    def forward(self, x, cos, sin, rt, prefill: bool, mask=None):
        # mask: prefill's sliding causal mask, handed over only where there is one
        extra = () if mask is None else (mask,)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, rt, self.layer, prefill, *extra)
        return x + self.mlp(self.post_attention_layernorm(x))


def rope_tables(spec: ModelSpec, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_positions, head_dim], float32, the same expression HF evaluates per step."""
    positions = torch.arange(spec.max_positions, device=inv_freq.device)
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class LlamaForCausalLM(nn.Module):
    # a family built on Llama's decoder (Qwen3) subclasses with its own name and layer
    family = "llama"
    layer_class = LlamaDecoderLayer

    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.family != self.family:
            raise ValueError(f"{type(self).__name__} needs a {self.family}-family spec, got "
                             f"{spec.model_type!r}")
        if spec.activation != "silu":
            raise ValueError(f"{self.family}-family activation must be silu, got {spec.activation!r}")
        if spec.num_heads % spec.num_kv_heads:
            raise ValueError(f"num_heads {spec.num_heads} is not a multiple of num_kv_heads {spec.num_kv_heads}")
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList([self.layer_class(spec, i) for i in range(spec.num_layers)])
        self.norm = RMSNorm(spec.hidden_size, spec.norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        # float32 always (see init_buffers); not persistent: HF checkpoints do not carry them
        self.register_buffer("inv_freq", rope_inv_freq(spec), persistent=False)
        cos, sin = rope_tables(spec, self.inv_freq)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share lm_head with the embedding when the spec says so (again after to_empty/load)."""
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_buffers(self) -> None:
        """(Re)compute inv_freq in float32 on the weights' device: after to_empty, or after a
        `.to(dtype)` that would otherwise have rounded it to half precision."""
        device = self.embed_tokens.weight.device
        if device.type != "meta":
            self.inv_freq = rope_inv_freq(self.spec, device=device)
            self.rope_cos, self.rope_sin = rope_tables(self.spec, self.inv_freq)

    def forward(self, input_ids, positions, rt: int, prefill: bool = False,
                last_only: bool = False):
        x = self.embed_tokens(input_ids)
        # as HF: angles in float32, cos/sin cast to the activation dtype. The dtype is taken
        # from a weight, not from x, so cos/sin (and the K,V path) stay independent of input_ids
        # (a table lookup: recomputing K,V for a token range clones this too, so it stays short)
        cos = self.rope_cos[positions].type_as(self.embed_tokens.weight)
        sin = self.rope_sin[positions].type_as(self.embed_tokens.weight)
        # windowed layers' prefill attends through a sliding causal mask (decode reads the
        # window only); spec.sliding_window is None for every other model
        window = self.spec.sliding_window if prefill else None
        mask = causal_mask(positions, window) if window is not None else None
        for layer in self.layers:
            x = layer(x, cos, sin, rt, prefill, mask if layer.window is not None else None)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))


# --- what the rest of kvc knows about the Llama family (the registry reads FAMILY) ------------

ROPE_TYPES = ("default", "linear", "llama3")


def rope_from_hf(cfg: dict, where: str) -> tuple[float, dict | None]:
    # transformers 5 writes `rope_parameters` (theta inside); 4.x wrote rope_theta + rope_scaling
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise KvcError(f"{where}: rope type {kind!r} is not supported; expected one of {list(ROPE_TYPES)}")
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


def spec_from_hf(cfg: dict, model_type: str, where: str) -> ModelSpec:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise KvcError(f"{where}: hidden_act {act!r} is not supported; expected 'silu'")
    if cfg.get("mlp_bias", False):
        raise KvcError(f"{where}: mlp_bias=true is not supported")
    theta, scaling = rope_from_hf(cfg, where)
    window_layers: tuple[int, ...] = ()
    if model_type == "qwen2":
        bias = True  # Qwen2 always has q/k/v biases, whatever attention_bias says
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
        if window:  # as HF: the layers layer_types names, else those from max_window_layers on
            layers = int(cfg["num_hidden_layers"])
            types = cfg.get("layer_types") or [
                "sliding_attention" if i >= int(cfg.get("max_window_layers", 28)) else "full_attention"
                for i in range(layers)]
            window_layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
            window = window if window_layers else None  # no layer slides: none is windowed
    else:
        bias = model_type == "llama" and bool(cfg.get("attention_bias", False))
        window = cfg.get("sliding_window") if model_type == "mistral" else None
    common = hf_common(cfg, model_type, "llama", tie_default=False)
    return ModelSpec(
        **common, num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        intermediate_size=int(cfg["intermediate_size"]), head_dim=int(cfg.get("head_dim") or 0),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, rope_scaling=scaling, attention_bias=bias,
        sliding_window=int(window) if window else None,
        window_layers=window_layers if window else (), activation="silu",
    )


def _llama(model_type, h, layers, heads, kv_heads, ffn, vocab, max_pos, theta, eps=1e-5, **kw):
    return ModelSpec(
        model_type=model_type, family="llama", vocab_size=vocab, hidden_size=h, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, intermediate_size=ffn, max_positions=max_pos,
        rope_theta=theta, norm_eps=eps, activation="silu", **kw,
    )


FAMILY = Family(
    name="llama", model_types=("llama", "mistral", "qwen2"), model_class=LlamaForCausalLM,
    spec_from_hf=spec_from_hf, hf_prefixes=("model.",), hf_renames=(),
    presets={
        "llama-2-7b": _llama("llama", 4096, 32, 32, 32, 11008, 32000, 4096, 10000.0),
        "llama-2-13b": _llama("llama", 5120, 40, 40, 40, 13824, 32000, 4096, 10000.0),
        "llama-2-70b": _llama("llama", 8192, 80, 64, 8, 28672, 32000, 4096, 10000.0),
        "llama-3-8b": _llama("llama", 4096, 32, 32, 8, 14336, 128256, 8192, 500000.0),
        # Llama-3.1-8B's shape: 128k positions through its RoPE scaling (config.json's values)
        "llama-3.1-8b": _llama("llama", 4096, 32, 32, 8, 14336, 128256, 131072, 500000.0,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192}),
        "mistral-7b": _llama("mistral", 4096, 32, 32, 8, 14336, 32000, 32768, 10000.0,
                             sliding_window=4096),
        "qwen2-7b": _llama("qwen2", 3584, 28, 28, 4, 18944, 152064, 32768, 1000000.0, eps=1e-6,
                           attention_bias=True),
        # tiny shapes for tests, examples and CI: real code paths, seconds on a CPU
        "tiny-llama": _llama("llama", 64, 2, 4, 4, 160, 512, 512, 10000.0),
        "tiny-llama-gqa": _llama("llama", 64, 2, 4, 2, 160, 512, 512, 10000.0),
    },
    # RMSNorm in fp32, RoPE on Q and K and SiLU x up run twice OPT's small kernels; RoPE a half
    # at a time costs 22 passes over recomputed K (H200 profiles, docs/CALIBRATION.md)
    costs=FamilyCosts(layer_ops=32, recompute_ops=5, elementwise_passes=22, host_op_weight=1.9),
)

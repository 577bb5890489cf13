"""OPT, every size: learned positions (offset 2), ReLU MLP, biases, pre- or post-LayerNorm.

Matches Hugging Face's OPTForCausalLM numerically. Quirks kept on purpose:
- q is scaled by head_dim**-0.5 right after q_proj (HF does it there, before the bias-free
  attention), so SDPA runs with scale=1.0;
- position ids index a table with 2 extra rows (`positions + 2`), a fairseq leftover;
- opt-350m is post-LN (`do_layer_norm_before=False`): the norms come after each residual add,
  there is no final LayerNorm, and embeddings live in a narrower `word_embed_proj_dim` space
  with `project_in` / `project_out` around the decoder.

Names mirror HF's `model.decoder.*` with the prefix dropped; HF's `self_attn.out_proj` is
called `o_proj` here so that every family exposes the same q/k/v/o modules to the compiler.

The forward contract (inputs, cache ops, traceability) is described in kvc/models/llama.py.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import kvc.ir.ops  # noqa: F401  (registers torch.ops.kvc.*)
from kvc.errors import KvcError
from kvc.models.attend import attend
from kvc.models.spec import Family, FamilyCosts, ModelSpec, hf_common

torch.fx.wrap("attend")  # a leaf of the traced graph: it picks the mask when the step runs

POSITION_OFFSET = 2  # OPT's learned position table starts at row 2

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def _norm(spec: ModelSpec, width: int) -> nn.LayerNorm:
    # HF builds these with nn.LayerNorm's default eps (1e-5), whatever the config says
    return nn.LayerNorm(width, eps=1e-5, elementwise_affine=spec.layer_norm_elementwise_affine)


class OPTAttention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, bias = spec.hidden_size, spec.enable_bias
        self.num_heads, self.head_dim = spec.num_heads, spec.head_dim
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(h, spec.q_width, bias=bias)
        self.k_proj = nn.Linear(h, spec.kv_width, bias=bias)
        self.v_proj = nn.Linear(h, spec.kv_width, bias=bias)
        self.o_proj = nn.Linear(spec.q_width, h, bias=bias)

    def forward(self, x, rt, layer: int, prefill: bool):
        # the K/V path (x -> k_proj/v_proj -> unflatten -> kv_write) reads nothing but x and
        # weights: the compiler clones exactly this subgraph to recompute K,V from stored x
        k = self.k_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        torch.ops.kvc.kv_write(k, v, rt, layer)
        q = (self.q_proj(x) * self.scaling).unflatten(-1, (self.num_heads, self.head_dim))
        q = q.transpose(1, 2)  # [b, H, T, hd]
        unit = None
        if prefill:
            k_all, v_all = k, v
        else:
            # the CPU lane (if the plan gives this unit one) starts on the oldest rows now
            unit = torch.ops.kvc.cpu_attn_begin(q, rt, layer, 1.0, 0.0)
            kv = torch.ops.kvc.kv_read(rt, layer)  # tokens [0, s+T): this step's included
            k_all, v_all = kv[0], kv[1]
        # kv_mask: the batch's padding mask for these rows (empty: no padding; kvc.models.attend)
        out = attend(q, k_all.transpose(1, 2), v_all.transpose(1, 2),
                     torch.ops.kvc.kv_mask(rt, layer), None, prefill, 1, 1.0, rt, unit)
        return self.o_proj(out.transpose(1, 2).flatten(-2))


class OPTDecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.layer = layer
        self.pre_ln = spec.do_layer_norm_before
        self.self_attn = OPTAttention(spec)
        self.self_attn_layer_norm = _norm(spec, spec.hidden_size)
        self.fc1 = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.enable_bias)
        self.fc2 = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.enable_bias)
        self.final_layer_norm = _norm(spec, spec.hidden_size)
        self.act = _ACTIVATIONS[spec.activation]

    def forward(self, x, rt, prefill: bool):
        if self.pre_ln:
            x = x + self.self_attn(self.self_attn_layer_norm(x), rt, self.layer, prefill)
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        # post-LN (opt-350m): the attention input is the residual stream itself
        x = self.self_attn_layer_norm(x + self.self_attn(x, rt, self.layer, prefill))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class OPTForCausalLM(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.family != "opt":
            raise ValueError(f"OPTForCausalLM needs an opt spec, got {spec.model_type!r}")
        if spec.activation not in _ACTIVATIONS:
            raise ValueError(f"OPT activation {spec.activation!r} not in {sorted(_ACTIVATIONS)}")
        self.spec = spec
        h, e = spec.hidden_size, spec.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(spec.vocab_size, e)
        self.embed_positions = nn.Embedding(spec.max_positions + POSITION_OFFSET, h)
        self.project_in = nn.Linear(e, h, bias=False) if e != h else None
        self.layers = nn.ModuleList([OPTDecoderLayer(spec, i) for i in range(spec.num_layers)])
        # post-LN models already end on a norm; HF builds no final one for them
        self.final_layer_norm = _norm(spec, h) if spec.do_layer_norm_before else None
        self.project_out = nn.Linear(h, e, bias=False) if e != h else None
        self.lm_head = nn.Linear(e, spec.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share lm_head with the embedding when the spec says so (again after to_empty/load)."""
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_buffers(self) -> None:
        """OPT has no computed buffers; present so every family has the same build verbs."""

    def forward(self, input_ids, positions, rt: int, prefill: bool = False,
                last_only: bool = False):
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + POSITION_OFFSET)
        for layer in self.layers:
            x = layer(x, rt, prefill)
        if last_only:
            x = x[:, -1:]
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return self.lm_head(x)


# --- what the rest of kvc knows about OPT (the registry reads FAMILY) -----------------------

def spec_from_hf(cfg: dict, model_type: str, where: str) -> ModelSpec:
    if cfg.get("_remove_final_layer_norm", False):
        raise KvcError(f"{where}: _remove_final_layer_norm=true is not supported")
    act = cfg.get("activation_function", "relu")
    if act not in _ACTIVATIONS:
        raise KvcError(f"{where}: activation_function {act!r} is not supported; expected relu, gelu or silu")
    common = hf_common(cfg, model_type, "opt", tie_default=True)
    return ModelSpec(
        **common, num_kv_heads=common["num_heads"], intermediate_size=int(cfg["ffn_dim"]),
        norm_eps=1e-5, do_layer_norm_before=bool(cfg.get("do_layer_norm_before", True)),
        word_embed_proj_dim=int(cfg.get("word_embed_proj_dim") or cfg["hidden_size"]),
        enable_bias=bool(cfg.get("enable_bias", True)),
        layer_norm_elementwise_affine=bool(cfg.get("layer_norm_elementwise_affine", True)),
        activation=act,
    )


def _opt(h, layers, heads, vocab=50272, **kw) -> ModelSpec:
    return ModelSpec(
        model_type="opt", family="opt", vocab_size=vocab, hidden_size=h, num_layers=layers,
        num_heads=heads, num_kv_heads=heads, intermediate_size=4 * h, max_positions=2048,
        tie_word_embeddings=True, activation="relu", norm_eps=1e-5, **kw,
    )


FAMILY = Family(
    name="opt", model_types=("opt",), model_class=OPTForCausalLM, spec_from_hf=spec_from_hf,
    hf_prefixes=("model.decoder.", "decoder.", "model."),
    hf_renames=((".self_attn.out_proj.", ".self_attn.o_proj."),),
    presets={
        "opt-125m": _opt(768, 12, 12),
        "opt-350m": _opt(1024, 24, 16, do_layer_norm_before=False, word_embed_proj_dim=512),
        "opt-1.3b": _opt(2048, 24, 32),
        "opt-2.7b": _opt(2560, 32, 32),
        "opt-6.7b": _opt(4096, 32, 32),
        "opt-13b": _opt(5120, 40, 40),
        "opt-30b": _opt(7168, 48, 56),
        "opt-66b": _opt(9216, 64, 72),
        "tiny-opt": _opt(64, 2, 4, vocab=512),  # tests, examples and CI: seconds on a CPU
    },
    # H200 profiles, 2026-11-28 (docs/CALIBRATION.md); its 16 layer ops cover its biases
    costs=FamilyCosts(layer_ops=16, recompute_ops=4, elementwise_passes=4, host_op_weight=1.5),
)

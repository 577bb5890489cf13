"""The peer: transformers' own offloaded KV cache on the same shape."""
from __future__ import annotations

import torch

from kvc.planner import cost

from .env import free_memory
from .timing import decode_ms


def hf_config(spec):
    import transformers

    if spec.family == "opt":
        return transformers.OPTConfig(
            vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, ffn_dim=spec.intermediate_size,
            num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
            max_position_embeddings=spec.max_positions, word_embed_proj_dim=spec.word_embed_proj_dim,
            do_layer_norm_before=spec.do_layer_norm_before)
    return transformers.LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_positions,
        rope_theta=spec.rope_theta)


def hf_offloaded(name, spec, batch, context, steps, log) -> list[dict]:
    """Transformers' own offloaded KV cache on the same shape (random weights)."""
    import transformers

    cfg = hf_config(spec)
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = None
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = None
    ids = torch.randint(0, spec.vocab_size, (batch, context), device="cuda")

    def gen(x, n, model=model):  # bound now: `model` is deleted below, before the memory is freed
        with torch.inference_mode():
            return model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  cache_implementation="offloaded")

    ms = decode_ms(gen, ids, steps, 1)
    log(f"{name} b={batch} s={context} hf_offloaded  {ms:8.2f} ms/token "
        f"(transformers {transformers.__version__})")
    del gen, model
    free_memory()
    kv = cost.kv_bytes(spec, batch, context, 2) * spec.num_layers
    return [{"model": name, "batch": batch, "context": context, "setting": "latency",
             "mode": "hf_offloaded", "decode_ms_per_token": round(ms, 3), "predicted_ms": None,
             "decode_tokens_per_s": round(batch * 1e3 / ms, 2), "bytes_per_step": int(kv),
             "link_utilization": None}]

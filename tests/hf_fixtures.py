"""Tiny random Hugging Face checkpoints for parity tests: configs built in code, no hub access.

Weights are drawn wider than HF's 0.02 default so that greedy decoding has clear winners:
with near-uniform logits a 1e-7 rounding difference could flip an argmax and make a
correct implementation fail a token-equality check.
"""
from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128)
INIT_STD = 0.15

# name -> (HF config class name, config kwargs)
CASES: dict[str, tuple[str, dict]] = {
    "opt-preln": ("OPTConfig", dict(ffn_dim=128, do_layer_norm_before=True, init_std=INIT_STD)),
    "opt-350m-shape": ("OPTConfig", dict(ffn_dim=128, do_layer_norm_before=False,
                                         word_embed_proj_dim=32, init_std=INIT_STD)),
    "llama2-mha": ("LlamaConfig", dict(intermediate_size=160, num_key_value_heads=4,
                                       rope_theta=10000.0, tie_word_embeddings=False,
                                       initializer_range=INIT_STD)),
    "llama3-gqa": ("LlamaConfig", dict(
        intermediate_size=160, num_key_value_heads=2, tie_word_embeddings=True,
        initializer_range=INIT_STD,
        # wavelengths of head_dim 16 at theta 5e5 straddle [16, 64]: all three llama3 branches
        rope_scaling={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(intermediate_size=160, num_key_value_heads=2,
                                      sliding_window=4096, tie_word_embeddings=False,
                                      initializer_range=INIT_STD)),
    "qwen2": ("Qwen2Config", dict(intermediate_size=160, num_key_value_heads=2,
                                  tie_word_embeddings=True, initializer_range=INIT_STD)),
}


def hf_config(case: str):
    import transformers

    cls_name, kwargs = CASES[case]
    cfg = getattr(transformers, cls_name)(**TINY, **kwargs)
    # no special tokens: nothing may stop or pad a 32-step greedy run
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = None
    return cfg


def hf_model(case: str, seed: int = 0):
    return random_hf_model(hf_config(case), seed)


def random_hf_model(cfg, seed: int = 0):
    """A random HF causal LM from a transformers config (eager attention, fp32), with its 1-D
    parameters moved off their initial values and no special tokens in its generation config."""
    import transformers

    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = None
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager", dtype=torch.float32)
    # HF starts biases at 0 and norms at 1: perturb them so a dropped bias or norm shows
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.generation_config.bos_token_id = None
    return model.eval()


def save_checkpoint(model, folder: Path, **save_kwargs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, **save_kwargs)
    return folder


def save_bin_checkpoint(model, folder: Path) -> Path:
    """A legacy `pytorch_model.bin` checkpoint (transformers 5 only writes safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def hf_greedy(model, input_ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's own greedy generate: tokens [b, s+steps] and raw logits [b, steps, vocab]."""
    with torch.no_grad():
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
            max_new_tokens=steps, output_logits=True,
            return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    return out.sequences, torch.stack(out.logits, dim=1)


def kv_write_leaves(write, source) -> tuple[set, set]:
    """What the path from a traced `kv_write` node back to the attention input `source`
    reads: leaf kinds ("source", placeholder names, "get_attr") and the weights' targets.
    The compiler clones that path to recompute K,V, so only source, positions and weights
    may appear."""
    stack, leaves, weights = list(write.args[:2]), set(), set()
    while stack:
        node = stack.pop()
        if node is source:
            leaves.add("source")
        elif node.op == "placeholder":
            leaves.add(node.target)
        elif node.op == "get_attr":
            leaves.add("get_attr")
            weights.add(node.target)
        else:
            stack.extend(node.all_input_nodes)
    return leaves, weights


def run_compiled(lowered, plan, spec, ids, steps: int):
    """(tokens, logits) of a CompiledModel assembled from `lowered` on the CPU, in float32."""
    from kvc.api import assemble

    cm = assemble(lowered, plan, spec, torch.float32, torch.device("cpu"))
    try:
        return cm.generate(ids, steps, return_logits=True)
    finally:
        cm.close()

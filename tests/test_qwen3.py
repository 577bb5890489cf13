"""The Qwen3 family (kvc/models/qwen3.py) against Hugging Face transformers, on tiny random
checkpoints (CPU, fp32): the reference decoder's logits within 1e-4 of HF's at every prefill
position and over 16 greedy steps, the same tokens; every compiled schedule, with K,V
recomputed through the cloned k_proj -> k_norm -> RoPE subgraph, gives the reference's tokens
and logits within 1e-5; the registry and the config mapping. Built like
tests/test_models_parity.py and tests/test_compiled_parity.py.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.fx

pytest.importorskip("transformers")

import hf_fixtures as hf  # noqa: E402
import kvc  # noqa: E402
from kvc.compiler.lowering import lower  # noqa: E402
from kvc.errors import KvcError  # noqa: E402
from kvc.ir.modes import NAMES as MODES  # noqa: E402
from kvc.ir.plan import forced_plan  # noqa: E402
from kvc.models import build_model, costs, family_of, param_count, preset, spec_from_hf_config  # noqa: E402
from kvc.models import qwen3  # noqa: E402
from kvc.models.checkpoint import read_config  # noqa: E402
from kvc.runtime.reference import ReferenceDecoder  # noqa: E402

ATOL_HF = 1e-4  # kvc vs transformers (test_models_parity.py)
ATOL_COMPILED = 1e-5  # compiled schedules vs the reference (test_compiled_parity.py)
STEPS = 16

pytestmark = pytest.mark.usefixtures("one_thread")

# head_dim 32 != hidden 64 / 4 heads: the explicit head_dim is read, not derived
TINY = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, head_dim=32,
            intermediate_size=160, max_position_embeddings=128, rope_theta=1000000.0,
            initializer_range=hf.INIT_STD)
CASES = {
    "untied-gqa": dict(num_hidden_layers=3, num_key_value_heads=2, tie_word_embeddings=False),
    "tied-mha": dict(num_hidden_layers=2, num_key_value_heads=4, tie_word_embeddings=True),
}


def hf_qwen3(case: str, seed: int = 0):
    """A random HF Qwen3ForCausalLM, as hf_fixtures.hf_model makes the other families: wide
    weights, and norm scales moved off 1 so that a dropped q_norm / k_norm shows."""
    import transformers

    return hf.random_hf_model(transformers.Qwen3Config(**TINY, **CASES[case]), seed)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """case -> (HF model, safetensors folder), written once per module."""
    out = {}
    for case in CASES:
        model = hf_qwen3(case)
        out[case] = (model, hf.save_checkpoint(model, tmp_path_factory.mktemp(case)))
    return out


def _load(folder):
    spec = spec_from_hf_config(read_config(folder))
    return spec, build_model(spec, "cpu", torch.float32, checkpoint=folder)


def _prompts(batch=3, length=7, seed=1):
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- vs transformers


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers(checkpoints, case):
    hf_model, folder = checkpoints[case]
    spec, model = _load(folder)
    assert (spec.family, spec.head_dim, spec.num_layers) == ("qwen3", 32, CASES[case]["num_hidden_layers"])
    assert spec.tie_word_embeddings == hf_model.config.tie_word_embeddings
    assert (model.lm_head.weight is model.embed_tokens.weight) == spec.tie_word_embeddings
    # the per-head norms came from the checkpoint (HF's, moved off 1), not from the builder
    hf_attn = hf_model.model.layers[1].self_attn
    assert torch.equal(model.layers[1].self_attn.k_norm.weight, hf_attn.k_norm.weight)
    assert torch.equal(model.layers[1].self_attn.q_norm.weight, hf_attn.q_norm.weight)

    ids = _prompts()
    ref = ReferenceDecoder(model, spec)
    with torch.no_grad():
        want = hf_model(ids).logits
    torch.testing.assert_close(ref.prefill_logits(ids), want, atol=ATOL_HF, rtol=0)
    tokens, logits = ref.generate(ids, STEPS, return_logits=True)
    want_tokens, want_logits = hf.hf_greedy(hf_model, ids, STEPS)
    torch.testing.assert_close(logits, want_logits, atol=ATOL_HF, rtol=0)
    assert torch.equal(tokens, want_tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_head_norm_rounds_like_transformers(dtype):
    """q_norm / k_norm on [b, T, heads, head_dim] against HF's Qwen3RMSNorm: equal bits."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    attn = qwen3.Qwen3Attention(preset("tiny-qwen3")).to(dtype)
    theirs = Qwen3RMSNorm(32, eps=1e-6).to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        attn.k_norm.weight.copy_(1 + torch.randn(32, generator=g) * 0.1)
        theirs.weight.copy_(attn.k_norm.weight)
    x = (torch.randn(3, 5, 2, 32, generator=g) * 4).to(dtype)
    assert torch.equal(attn.k_norm(x), theirs(x))


# --------------------------------------------------------------------------- the traced graph


def test_kv_write_depends_only_on_attention_input():
    """The path attention input -> kv_write (what the compiler clones to recompute K,V) reads
    only the attention input, positions (RoPE) and weights, k_norm's among them."""
    spec = preset("tiny-qwen3")
    gm = torch.fx.symbolic_trace(build_model(spec, "meta", torch.float16),
                                 concrete_args={"prefill": False, "last_only": False})
    writes = [n for n in gm.graph.nodes if "kv_write" in str(n.target)]
    assert len(writes) == spec.num_layers
    for write in writes:
        i = write.args[3]
        source = next(n for n in gm.graph.nodes if n.target == f"layers.{i}.self_attn.k_proj").args[0]
        leaves, weights = hf.kv_write_leaves(write, source)
        assert leaves == {"source", "get_attr", "positions"}, leaves
        assert f"layers.{i}.self_attn.k_norm.weight" in weights
        assert f"layers.{i}.self_attn.q_norm.weight" not in weights


# --------------------------------------------------------------------------- compiled schedules


@pytest.fixture(scope="module")
def loaded(checkpoints):
    """The untied GQA checkpoint in kvc, its reference tokens and logits."""
    spec, model = _load(checkpoints["untied-gqa"][1])
    ids = _prompts(batch=2, length=7, seed=3)
    return spec, model, ids, *ReferenceDecoder(model, spec).generate(ids, 10, return_logits=True)


@pytest.mark.parametrize("mode", MODES)
def test_compiled_schedules_match_reference(loaded, mode):
    spec, model, ids, ref_tokens, ref_logits = loaded
    prompt, gen = ids.shape[1], ref_tokens.shape[1] - ids.shape[1]
    for fraction in (0.0, 0.5, 1.0):
        plan = forced_plan(mode, spec.num_layers, prompt, gen, 64, fraction, act_chunks=2)
        low = lower(model, plan)
        if fraction > 0 and mode != "gpu_resident":
            # K,V really are recomputed, and every chunk's clone applies k_norm
            for i in range(spec.num_layers):
                w = next(n for n in low.decode.graph.nodes if n.op == "get_attr"
                         and n.meta.get("kvc", {}).get("target") == f"layers.{i}.self_attn.k_norm.weight")
                clones = {u.name.split("_")[1] for u in w.users if u.name.startswith(f"re{i}_")}
                want = {str(j) for j in range(plan.act_chunks)}
                assert clones == want, (mode, i, [u.name for u in w.users])
        tokens, logits = hf.run_compiled(low, plan, spec, ids, gen)
        where = f"{mode} fraction={fraction}"
        assert torch.equal(tokens, ref_tokens), where
        err = (logits - ref_logits).abs().max().item()
        assert err <= ATOL_COMPILED, f"logits off by {err:.2e}: {where}"


# Blocked outside the family's files: the planner's host-node tables (HOST_NODES and
# GRAPHED_NODES, kvc/planner/host.py) are keyed by family name and have no 'qwen3' row, so
# planning raises KeyError('qwen3'). Not strict: the working tree's kvc/compiler/host_counts.py
# (counts read off the lowered graph) makes it pass in every mode; drop this once that lands.
@pytest.mark.parametrize("mode", MODES)
def test_compile_and_load_end_to_end(checkpoints, loaded, tmp_path, mode):
    spec, _, ids, ref_tokens, ref_logits = loaded
    gen = ref_tokens.shape[1] - ids.shape[1]
    yaml = tmp_path / "qwen3.yaml"
    yaml.write_text(
        f"model:\n  checkpoint: {checkpoints['untied-gqa'][1]}\n  dtype: float32\n"
        f"workload:\n  batch_size: {ids.shape[0]}\n  prompt_len: {ids.shape[1]}\n  gen_len: {gen}\n"
        "hardware: cpu\n")
    overrides = [f"schedule.mode={mode}"]
    if mode in ("pipelined", "kvpr"):
        overrides.append("schedule.recompute_fraction=0.5")
    artifact = kvc.compile(yaml, overrides=overrides, output=tmp_path / "qwen3.kvc")
    tokens, logits = kvc.load(artifact, device="cpu").generate(ids, gen, return_logits=True)
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref_logits).abs().max().item() <= ATOL_COMPILED


# --------------------------------------------------------------------------- registry, config


def _config(**changes) -> dict:
    """A Qwen3-8B config.json as released (transformers 4.51 spelling)."""
    cfg = {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
           "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
           "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 12288,
           "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
           "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
           "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
           "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
    return {**cfg, **changes}


def test_registry_maps_qwen3():
    spec = spec_from_hf_config(_config())
    assert family_of(spec) is qwen3.FAMILY and spec.model_type == "qwen3"
    assert replace(spec, extra={}, eos_token_id=(), pad_token_id=None) == preset("qwen3-8b")
    assert spec.eos_token_id == (151645,)  # the checkpoint's EOS, which presets do not carry
    assert family_of(preset("tiny-qwen3")) is qwen3.FAMILY
    # head_dim left out: HF's Qwen3Config default (128), not hidden_size / heads
    cfg = _config(hidden_size=1024, num_attention_heads=16)
    del cfg["head_dim"]
    assert spec_from_hf_config(cfg).head_dim == 128
    assert qwen3.FAMILY.kvc_name("model.layers.3.self_attn.k_norm.weight") == "layers.3.self_attn.k_norm.weight"
    c, llama = costs(spec), costs(preset("llama-3-8b"))
    assert c.layer_ops > llama.layer_ops and c.elementwise_passes > llama.elementwise_passes


@pytest.mark.parametrize("name,total,non_embedding", [
    ("qwen3-0.6b", 0.60e9, 0.44e9), ("qwen3-1.7b", 1.72e9, 1.41e9), ("qwen3-4b", 4.02e9, 3.63e9),
    ("qwen3-8b", 8.19e9, 6.95e9), ("qwen3-14b", 14.77e9, 13.21e9), ("qwen3-32b", 32.76e9, 31.21e9)])
def test_presets_have_the_model_cards_parameter_counts(name, total, non_embedding):
    spec = preset(name)
    embeddings = spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2)
    assert param_count(spec) == pytest.approx(total, rel=0.01)
    assert param_count(spec) - embeddings == pytest.approx(non_embedding, rel=0.01)


@pytest.mark.parametrize("changes,message", [
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
    ({"attention_bias": True}, r"attention_bias=true is not supported"),
    ({"use_sliding_window": True, "sliding_window": 4096}, r"use_sliding_window=true is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope type 'yarn' is not supported"),
    ({"intermediate_size": None}, r"wrong type"),
])
def test_unsupported_config_is_a_one_line_kvc_error(changes, message):
    with pytest.raises(KvcError, match=message) as e:
        spec_from_hf_config(_config(**changes), where="qwen/config.json")
    assert str(e.value).startswith("qwen/config.json: ") and "\n" not in str(e.value)


def test_missing_key_is_a_kvc_error():
    cfg = _config()
    del cfg["intermediate_size"]
    with pytest.raises(KvcError, match=r"missing key 'intermediate_size'.*'qwen3'"):
        spec_from_hf_config(cfg)

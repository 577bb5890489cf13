"""kvc's model families against Hugging Face transformers, on tiny random checkpoints (CPU, fp32).

Parity: logits within 1e-4 at every prefill position and over 32 greedy decode steps, the
same tokens, a batch of 3 different prompts. Also the checkpoint formats (single and sharded
safetensors, pytorch_model.bin), the loader's errors, dummy-weight building, and that
torch.fx traces of prefill and decode give the eager logits.
"""
from __future__ import annotations

import json
import pickle

import pytest
import torch
import torch.fx
from torch import nn

pytest.importorskip("transformers")

import hf_fixtures as hf  # noqa: E402
from kvc.errors import KvcError  # noqa: E402
from kvc.models import build_model, checkpoint_files, preset, spec_from_hf_config  # noqa: E402
from kvc.models.checkpoint import read_config  # noqa: E402
from kvc.runtime.reference import ReferenceDecoder  # noqa: E402

ATOL = 1e-4
STEPS = 32


def _prompts(batch=3, length=7, vocab=512, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _load(folder):
    spec = spec_from_hf_config(read_config(folder))
    return spec, build_model(spec, "cpu", torch.float32, checkpoint=folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """case -> (HF model, safetensors checkpoint folder), built once per module."""
    out = {}
    for case in hf.CASES:
        model = hf.hf_model(case)
        out[case] = (model, hf.save_checkpoint(model, tmp_path_factory.mktemp(case)))
    return out


def _assert_parity(hf_model, spec, model, prompts=None):
    ids = _prompts() if prompts is None else prompts
    ref = ReferenceDecoder(model, spec)
    with torch.no_grad():
        want = hf_model(ids).logits
    got = ref.prefill_logits(ids)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    tokens, logits = ref.generate(ids, STEPS, return_logits=True)
    want_tokens, want_logits = hf.hf_greedy(hf_model, ids, STEPS)
    assert logits.shape == (ids.shape[0], STEPS, spec.vocab_size)
    torch.testing.assert_close(logits, want_logits, atol=ATOL, rtol=0)
    assert torch.equal(tokens, want_tokens)


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", list(hf.CASES))
def test_parity_with_transformers(checkpoints, case):
    hf_model, folder = checkpoints[case]
    spec, model = _load(folder)
    assert spec.tie_word_embeddings == hf_model.config.tie_word_embeddings
    if spec.tie_word_embeddings:
        assert model.lm_head.weight is model.embed_tokens.weight
    _assert_parity(hf_model, spec, model)


def test_prompts_differ_per_row(checkpoints):
    # rows must not leak into each other: row 1 alone gives the batched row 1's tokens
    hf_model, folder = checkpoints["llama3-gqa"]
    spec, model = _load(folder)
    ids = _prompts()
    ref = ReferenceDecoder(model, spec)
    batched = ref.generate(ids, 8)
    assert torch.equal(ref.generate(ids[1:2], 8), batched[1:2])
    assert not torch.equal(batched[0], batched[1])


def test_sharded_safetensors(checkpoints, tmp_path):
    hf_model, _ = checkpoints["llama2-mha"]
    folder = hf.save_checkpoint(hf_model, tmp_path / "sharded", max_shard_size="40KB")
    files = checkpoint_files(folder)
    assert len(files) > 1 and all(f.suffix == ".safetensors" for f in files)
    spec, model = _load(folder)
    _assert_parity(hf_model, spec, model)


@pytest.mark.parametrize("case", ["opt-350m-shape", "qwen2"])
def test_pytorch_model_bin(checkpoints, tmp_path, case):
    hf_model, _ = checkpoints[case]
    folder = hf.save_bin_checkpoint(hf_model, tmp_path / "bin")
    assert [f.name for f in checkpoint_files(folder)] == ["pytorch_model.bin"]
    spec, model = _load(folder)
    _assert_parity(hf_model, spec, model)


# --------------------------------------------------------------------------- errors


class _NotATensor:
    pass


def test_unsupported_model_type():
    with pytest.raises(KvcError, match=r"'gpt2'.*llama.*opt"):
        spec_from_hf_config({"model_type": "gpt2", "vocab_size": 10})


def test_shape_mismatch_names_the_tensor(checkpoints, tmp_path):
    _, folder = checkpoints["mistral"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").symlink_to(folder / "model.safetensors")
    cfg = read_config(folder)
    cfg["intermediate_size"] = 128
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KvcError, match=r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape "
                                       r"\[(64, 160|160, 64)\], expected \[(64, 128|128, 64)\]"):
        _load(bad)


def _rewrite(folder, dest, drop=(), add=None):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    for name in drop:
        tensors.pop(name)
    tensors.update(add or {})
    dest.mkdir()
    (dest / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, dest / "model.safetensors")
    return dest


def test_missing_tensor(checkpoints, tmp_path):
    _, folder = checkpoints["qwen2"]
    bad = _rewrite(folder, tmp_path / "bad", drop=["model.layers.1.self_attn.k_proj.bias"])
    with pytest.raises(KvcError, match=r"lacks tensor 'model\.layers\.1\.self_attn\.k_proj\.bias' "
                                       r"\(expected shape \[32\]\)"):
        _load(bad)


def test_unexpected_tensor(checkpoints, tmp_path):
    _, folder = checkpoints["opt-preln"]
    bad = _rewrite(folder, tmp_path / "bad", add={"model.decoder.layers.9.fc1.weight": torch.zeros(2, 2)})
    with pytest.raises(KvcError, match=r"unexpected tensor 'model\.decoder\.layers\.9\.fc1\.weight'"):
        _load(bad)


def test_untied_checkpoint_without_lm_head_is_missing(checkpoints, tmp_path):
    _, folder = checkpoints["llama2-mha"]
    bad = _rewrite(folder, tmp_path / "bad", drop=["lm_head.weight"])
    with pytest.raises(KvcError, match=r"lacks tensor 'lm_head\.weight'"):
        _load(bad)


def test_refused_pickle_names_the_file(checkpoints, tmp_path):
    hf_model, _ = checkpoints["opt-preln"]
    folder = tmp_path / "evil"
    folder.mkdir()
    hf_model.config.save_pretrained(folder)
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": _NotATensor()}, f, protocol=2)
    with pytest.raises(KvcError, match=r"pytorch_model\.bin: refused by torch\.load\(weights_only=True\)"
                                       r".*_NotATensor"):
        _load(folder)


def test_no_weights(tmp_path):
    with pytest.raises(KvcError, match="no weights found"):
        checkpoint_files(tmp_path)


def test_transformers4_style_rope_config():
    base = hf.hf_config("llama3-gqa").to_dict()
    v5 = spec_from_hf_config(base)
    params = dict(base.pop("rope_parameters"))
    old = dict(base, rope_theta=params.pop("rope_theta"),
               rope_scaling=dict(params, type=params.pop("rope_type")))
    assert spec_from_hf_config(old) == v5
    assert v5.rope_scaling["rope_type"] == "llama3" and v5.rope_theta == 500000.0


# --------------------------------------------------------------------------- building


def test_dummy_weights_deterministic_and_tied():
    spec = preset("tiny-opt")
    a = build_model(spec, "cpu", torch.float32, seed=3)
    b = build_model(spec, "cpu", torch.float32, seed=3)
    c = build_model(spec, "cpu", torch.float32, seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.layers[0].fc1.weight, c.layers[0].fc1.weight)
    assert a.lm_head.weight is a.embed_tokens.weight
    assert float(a.layers[0].fc1.weight.std()) == pytest.approx(0.02, rel=0.1)


def test_meta_and_half_builds():
    spec = preset("tiny-llama-gqa")
    meta = build_model(spec, "meta", "float16")
    assert all(p.is_meta and p.dtype == torch.float16 for p in meta.parameters())
    model = build_model(spec, "cpu", torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32  # RoPE angles stay exact in half-precision models
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    tokens = ReferenceDecoder(model, spec).generate(_prompts(2, 5), 4)
    assert tokens.shape == (2, 9)


# --------------------------------------------------------------------------- torch.fx


class _Traced(nn.Module):
    """Runs the fx traces of prefill and decode in place of the eager model."""

    def __init__(self, model):
        super().__init__()
        self.prefill = torch.fx.symbolic_trace(model, concrete_args={"prefill": True, "last_only": False})
        self.decode = torch.fx.symbolic_trace(model, concrete_args={"prefill": False, "last_only": False})

    def forward(self, input_ids, positions, rt, prefill=False, last_only=False):
        gm = self.prefill if prefill else self.decode
        # the specialised flags stay in the signature, checked against the traced value
        out = gm(input_ids, positions, rt, prefill, False)
        return out[:, -1:] if last_only else out


@pytest.mark.parametrize("case", ["opt-preln", "opt-350m-shape", "llama3-gqa", "qwen2"])
def test_fx_trace_matches_eager(checkpoints, case):
    _, folder = checkpoints[case]
    spec, model = _load(folder)
    traced = _Traced(model)
    for gm in (traced.prefill, traced.decode):
        ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        assert ops.count(torch.ops.kvc.kv_write.default) + ops.count(torch.ops.kvc.kv_write) == spec.num_layers
    decode_reads = [n for n in traced.decode.graph.nodes if "kv_read" in str(n.target)]
    prefill_reads = [n for n in traced.prefill.graph.nodes if "kv_read" in str(n.target)]
    assert len(decode_reads) == spec.num_layers and not prefill_reads
    ids = _prompts()
    want_tokens, want_logits = ReferenceDecoder(model, spec).generate(ids, 8, return_logits=True)
    tokens, logits = ReferenceDecoder(traced, spec).generate(ids, 8, return_logits=True)
    assert torch.equal(tokens, want_tokens)
    # eager prefill uses last_only (a 1-row lm_head GEMM), the trace slices after: rounding only
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=0)


def test_fx_trace_of_meta_model():
    for name in ("tiny-opt", "tiny-llama-gqa"):
        model = build_model(preset(name), "meta", torch.float16)
        for prefill in (True, False):
            gm = torch.fx.symbolic_trace(model, concrete_args={"prefill": prefill, "last_only": False})
            assert any("kv_write" in str(n.target) for n in gm.graph.nodes)


def _tiny_spec(name):
    if name == "tiny-opt-post-ln":  # the opt-350m shape
        spec = preset("tiny-opt")
        return type(spec)(**{**spec.to_dict(), "do_layer_norm_before": False, "word_embed_proj_dim": 32})
    return preset(name)


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-opt-post-ln", "tiny-llama-gqa"])
def test_kv_write_depends_only_on_attention_input(name):
    """The compiler clones the path attention-input -> kv_write to recompute K,V: that path
    may read only the attention input, `positions`, and weights/buffers."""
    spec = _tiny_spec(name)
    gm = torch.fx.symbolic_trace(build_model(spec, "meta", torch.float16),
                                 concrete_args={"prefill": False, "last_only": False})
    for write in [n for n in gm.graph.nodes if "kv_write" in str(n.target)]:
        layer = write.args[3]
        k_proj = next(n for n in gm.graph.nodes if n.target == f"layers.{layer}.self_attn.k_proj")
        v_proj = next(n for n in gm.graph.nodes if n.target == f"layers.{layer}.self_attn.v_proj")
        source = k_proj.args[0]
        assert v_proj.args[0] is source
        leaves, _ = hf.kv_write_leaves(write, source)
        assert "source" in leaves and leaves <= {"source", "get_attr", "positions"}, leaves
        if spec.family == "llama":
            assert "positions" in leaves  # RoPE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_rounds_like_transformers_bit_for_bit(dtype):
    """kvc's half-at-a-time RoPE against HF's apply_rotary_pos_emb on HF's own tables, with
    llama3 scaling too: equal bits in every dtype (the proof is in LlamaAttention._rope)."""
    from dataclasses import replace

    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from kvc.models import preset
    from kvc.models.llama import LlamaAttention, rope_inv_freq, rope_tables

    scaled = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    for spec in (preset("tiny-llama"), replace(preset("tiny-llama"), rope_scaling=scaled)):
        attn = LlamaAttention(spec)
        cos, sin = (t.to(dtype) for t in rope_tables(spec, rope_inv_freq(spec)))
        g = torch.Generator().manual_seed(0)
        pos = torch.randint(0, spec.max_positions, (7,), generator=g)
        x = (torch.randn(3, 7, spec.num_heads, spec.head_dim, generator=g) * 4).to(dtype)
        # HF: [b, heads, T, hd] with cos/sin [b, T, hd] unsqueezed at dim 1
        want, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2),
                                       cos[pos][None], sin[pos][None])
        assert torch.equal(attn._rope(x, cos[pos], sin[pos]), want.transpose(1, 2))

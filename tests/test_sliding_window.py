"""Sliding-window attention (Mistral; any spec with sliding_window / window_layers): the
reference decoder against Hugging Face past the window, every compiled schedule against the
reference, and the offloaded cache reading, copying and recomputing only the window's rows.

A query at position q attends to keys k with q - k < W (transformers' sliding_window_overlay),
so a decode step at context s reads the W-1 cached rows [s-W+1, s) (ModelSpec.cached_tokens)
and its own.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.overrides import TorchFunctionMode

pytest.importorskip("transformers")

import hf_fixtures as hf  # noqa: E402
from kvc.api import assemble  # noqa: E402
from kvc.compiler.lowering import lower  # noqa: E402
from kvc.ir.plan import Plan, forced_plan  # noqa: E402
from kvc.models import build_model, preset, spec_from_hf_config  # noqa: E402
from kvc.models.checkpoint import read_config  # noqa: E402
from kvc.runtime.device_cache import DeviceCache  # noqa: E402
from kvc.runtime.offloaded import OffloadedCache  # noqa: E402
from kvc.runtime.reference import ReferenceDecoder  # noqa: E402
from kvc_fixtures import perturb_small_params  # noqa: E402

W = 8
PROMPT, GEN = 12, 16  # both past the window: prefill masks, decode slides
ATOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")


def _prompts(batch=2, length=PROMPT, vocab=512, seed=3):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """A tiny random HF Mistral with sliding_window=8, saved; kvc's spec and model of it."""
    import transformers

    cfg = transformers.MistralConfig(**hf.TINY, intermediate_size=160, num_key_value_heads=2,
                                     sliding_window=W, tie_word_embeddings=False,
                                     initializer_range=hf.INIT_STD)
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = None
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                                          dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = None
    model.generation_config.bos_token_id = None
    folder = hf.save_checkpoint(model.eval(), tmp_path_factory.mktemp("mistral-w8"))
    spec = spec_from_hf_config(read_config(folder))
    return model, spec, build_model(spec, "cpu", torch.float32, checkpoint=folder)


def test_spec_windows_every_mistral_layer(mistral):
    _, spec, _ = mistral
    assert spec.sliding_window == W and spec.window_layers == ()
    assert [spec.cached_tokens(i, 30) for i in range(spec.num_layers)] == [W - 1] * spec.num_layers
    assert spec.cached_tokens(0, 3) == 3


def test_qwen2_windows_only_the_layers_hf_slides():
    base = dict(hf.TINY, model_type="qwen2", intermediate_size=160, num_key_value_heads=2,
                num_hidden_layers=4, sliding_window=W, use_sliding_window=True)
    spec = spec_from_hf_config(dict(base, max_window_layers=2))
    assert spec.sliding_window == W and spec.window_layers == (2, 3)
    assert [spec.window(i) for i in range(4)] == [None, None, W, W]
    assert spec_from_hf_config(dict(base, max_window_layers=4)).sliding_window is None
    assert spec_from_hf_config(dict(base, use_sliding_window=False)).sliding_window is None
    types = ["sliding_attention", "full_attention"] * 2
    assert spec_from_hf_config(dict(base, layer_types=types)).window_layers == (0, 2)


def test_reference_matches_transformers_past_the_window(mistral):
    hf_model, spec, model = mistral
    ids = _prompts()
    ref = ReferenceDecoder(model, spec)
    with torch.no_grad():
        want = hf_model(ids).logits
    torch.testing.assert_close(ref.prefill_logits(ids), want, atol=ATOL, rtol=0)
    tokens, logits = ref.generate(ids, GEN, return_logits=True)
    want_tokens, want_logits = hf.hf_greedy(hf_model, ids, GEN)
    torch.testing.assert_close(logits, want_logits, atol=ATOL, rtol=0)
    assert torch.equal(tokens, want_tokens)
    # the window matters here: the same weights attending to everything decode otherwise
    full = ReferenceDecoder(model, replace(spec, sliding_window=None))
    assert not torch.allclose(full.generate(ids, GEN, return_logits=True)[1], logits, atol=1e-2)


def test_device_cache_reads_the_window():
    c = DeviceCache(2, 1, 32, 1, 2, torch.float32, "cpu", windows={0: W, 1: None})
    for s in range(20):
        c.kv_write(torch.full((1, 1, 1, 2), float(s)), torch.zeros(1, 1, 1, 2), 0)
        c.kv_write(torch.full((1, 1, 1, 2), float(s)), torch.zeros(1, 1, 1, 2), 1)
        k0, k1 = c.kv_read(0)[0], c.kv_read(1)[0]
        assert k0[0, :, 0, 0].tolist() == list(range(max(0, s - W + 1), s + 1))
        assert k1.shape[1] == s + 1
        c.advance(1)


# --- compiled schedules against the reference -------------------------------------------------

def window_plan(mode: str, spec, prompt: int, gen: int, fraction: float, act_chunks: int = 3,
                resident: tuple[bool, ...] | None = None) -> Plan:
    """What the planner's window pricing produces: l = round(fraction * n) of the n cached
    tokens each layer reads (ModelSpec.cached_tokens), so windowed layers both recompute
    and copy."""
    base = forced_plan(mode, spec.num_layers, prompt, gen, 64, fraction, act_chunks=act_chunks)
    rows = tuple(tuple(round(fraction * spec.cached_tokens(i, prompt + j)) for i in range(spec.num_layers))
                 for j in range(gen + 1))
    return replace(base, forced_fraction=None, recompute=rows,
                   resident=base.resident if resident is None else resident)


def _generate(spec, model, plan: Plan, ids):
    cm = assemble(lower(model, plan), plan, spec, torch.float32, torch.device("cpu"))
    try:
        return cm.generate(ids, GEN, return_logits=True)
    finally:
        cm.close()


def _plans(spec):
    n = spec.num_layers
    yield forced_plan("full_offload", n, PROMPT, GEN, 64, 0.0)
    yield forced_plan("gpu_resident", n, PROMPT, GEN, 64, 0.0)
    for mode in ("pipelined", "kvpr"):
        chunks = 1 if mode == "kvpr" else 3
        yield forced_plan(mode, n, PROMPT, GEN, 64, 0.5, act_chunks=chunks)  # l capped at n
        yield window_plan(mode, spec, PROMPT, GEN, 0.5, act_chunks=chunks)
    yield window_plan("pipelined", spec, PROMPT, GEN, 1 / 3, resident=(True,) + (False,) * (n - 1))
    yield forced_plan("pipelined", n, PROMPT, GEN, 64, 0.5, act_chunks=2, micro_batches=2)


def test_compiled_schedules_match_the_reference(mistral):
    _, spec, model = mistral
    ids = _prompts()
    ref_tokens, ref_logits = ReferenceDecoder(model, spec).generate(ids, GEN, return_logits=True)
    for plan in _plans(spec):
        tokens, logits = _generate(spec, model, plan, ids)
        where = f"{plan.mode} forced={plan.forced_fraction} m={plan.micro_batches} {plan.resident}"
        assert torch.equal(tokens, ref_tokens), where
        assert (logits - ref_logits).abs().max().item() <= 1e-5, where


def test_mixed_window_layers_match_the_reference():
    """Window on layer 0 only (Gemma 2's alternation, on a llama): both kinds in one step."""
    spec = replace(preset("tiny-llama-gqa"), model_type="mistral", sliding_window=W, window_layers=(0,))
    model = perturb_small_params(build_model(spec, "cpu", torch.float32, seed=0))
    ids = _prompts(batch=3, seed=5)
    ref_tokens, ref_logits = ReferenceDecoder(model, spec).generate(ids, GEN, return_logits=True)
    for plan in (window_plan("pipelined", spec, PROMPT, GEN, 0.5),
                 window_plan("kvpr", spec, PROMPT, GEN, 0.25, act_chunks=1),
                 forced_plan("pipelined", 2, PROMPT, GEN, 64, 0.5, act_chunks=3)):
        tokens, logits = _generate(spec, model, plan, ids)
        assert torch.equal(tokens, ref_tokens), plan.mode
        assert (logits - ref_logits).abs().max().item() <= 1e-5, plan.mode


# --- what the offloaded cache copies and recomputes -------------------------------------------

class CopyLog(TorchFunctionMode):
    """Every Tensor.copy_ whose source is a view of one of the cache's CPU pools, as
    (context s, pool name, unit, first token, tokens): what crosses the link."""

    def __init__(self, cm):
        super().__init__()
        self.cm, self.log = cm, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        c = self.cm._cache
        if func is torch.Tensor.copy_ and c is not None:
            src = args[1]
            for name, pool, base in (("act", c.act_pool, c.act_base), ("k", c.k_pool, c.kv_base),
                                     ("v", c.v_pool, c.kv_base)):
                if src.untyped_storage().data_ptr() == pool.untyped_storage().data_ptr():
                    j, row = divmod(src.storage_offset(), pool.stride(0))
                    unit = c.offloaded[j]
                    self.log.append((c.s, name, unit, base[unit] + row // pool.stride(1), src.shape[0]))
        return func(*args, **(kwargs or {}))


def test_windowed_layers_copy_and_recompute_only_the_window():
    """Layer 0 windowed (W=8), layer 1 not, both offloaded, at contexts up to 5 W: per step
    layer 0 moves exactly the W-1 rows [s-W+1, s) (activations then K,V), layer 1 all s."""
    spec = replace(preset("tiny-llama-gqa"), model_type="mistral", sliding_window=W, window_layers=(0,))
    model = perturb_small_params(build_model(spec, "cpu", torch.float32, seed=0))
    prompt, gen = 12, 30
    plan = window_plan("pipelined", spec, prompt, gen, 0.5)
    cm = assemble(lower(model, plan), plan, spec, torch.float32, torch.device("cpu"))
    ids = _prompts(batch=2, length=prompt, seed=7)
    with CopyLog(cm) as mode:
        tokens = cm.generate(ids, gen)
    c = cm._cache
    assert torch.equal(tokens, ReferenceDecoder(model, spec).generate(ids, gen))
    # the windowed unit's pools keep what its contexts read, the full unit's all of it
    assert c.act_base[0] == prompt - W + 1 and c.kv_base[1] == c.kv_lo
    assert c.k_stage.shape[1] == c.max_tokens  # the full layer stages every row
    steps = sorted({s for s, *_ in mode.log})
    assert steps == list(range(prompt, prompt + gen - 1))
    for s in steps:
        for unit, want in ((0, range(s - W + 1, s)), (1, range(0, s))):
            got = {kind: [] for kind in ("act", "k", "v")}
            for s_, kind, u, first, n in mode.log:
                if s_ == s and u == unit:
                    got[kind] += range(first, first + n)
            l = plan.recompute_tokens(unit, s)
            assert got["k"] == got["v"]
            assert got["act"] + got["k"] == list(want), (s, unit)  # every row once, in order
            assert len(got["act"]) == l and l > 0 and len(got["k"]) > 0
            if unit == 0:
                assert len(got["act"]) + len(got["k"]) == W - 1 < s
    cm.close()


def test_recompute_positions_are_the_windows_absolute_positions():
    plan = forced_plan("pipelined", 2, 16, 40, 64, 0.25, act_chunks=3)
    c = OffloadedCache(plan, num_layers=2, batch=1, max_tokens=56, act_width=8, num_kv_heads=1,
                       head_dim=4, dtype=torch.float32, device=torch.device("cpu"), num_events=0,
                       windows=(W, None), min_context=16)
    for s in (16, 30, 55):
        c.begin_step(s, 1)
        pos = [torch.cat([c.recompute_positions(u, j) for j in range(3)]).tolist() for u in (0, 1)]
        l0 = min(round(0.25 * s), W - 1)
        assert pos[0] == list(range(s - W + 1, s - W + 1 + l0))
        assert pos[1] == list(range(round(0.25 * s)))
        assert c.cached == {0: W - 1, 1: s}
    # the windowed unit's pools: activations from the first window on, K,V from its first copy
    assert c.act_base[0] == 16 - W + 1 and c.kv_base[0] == 16 - W + 1 + 4
    assert c.act_rows >= max(s - W + 1 + min(round(0.25 * s), W - 1) for s in range(16, 56)) - c.act_base[0]

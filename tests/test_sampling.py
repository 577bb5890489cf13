"""Sampling and stopping (kvc.runtime.sampling) in CompiledModel.generate and the reference
decoder, against transformers: the warpers equal its logits processors on random logits,
top_k=1 sampling is greedy, a seed reproduces its tokens (compiled == reference), and EOS
stops a batch exactly as transformers' generate does, with fewer compiled decode steps.
"""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from kvc.api import assemble
from kvc.compiler.lowering import lower
from kvc.errors import KvcError
from kvc.ir.plan import forced_plan
from kvc.models import build_model, preset
from kvc.runtime.reference import ReferenceDecoder
from kvc.runtime.sampling import (Sampler, Stopping, apply_repetition_penalty, apply_temperature,
                                  apply_top_k, apply_top_p)

pytestmark = pytest.mark.usefixtures("one_thread")

GEN = 12
MODES = ["pipelined", "gpu_resident"]


# --------------------------------------------------------------------------- warpers


def _random_logits(seed=0, b=4, vocab=300):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, vocab, generator=g) * 3


def test_warpers_equal_transformers():
    tp = pytest.importorskip("transformers.generation.logits_process")
    ids = torch.randint(0, 300, (4, 9), generator=torch.Generator().manual_seed(5))
    for seed in range(3):
        x = _random_logits(seed)
        for t in (0.3, 0.7, 1.5):
            assert torch.equal(apply_temperature(x, t), tp.TemperatureLogitsWarper(t)(ids, x))
        for k in (1, 5, 50, 300, 1000):
            assert torch.equal(apply_top_k(x, k), tp.TopKLogitsWarper(k)(ids, x))
        for p in (0.05, 0.3, 0.5, 0.9, 0.999, 1.0):
            assert torch.equal(apply_top_p(x, p), tp.TopPLogitsWarper(p)(ids, x))
        for r in (0.8, 1.3):
            want = tp.RepetitionPenaltyLogitsProcessor(r)(ids, x.clone())
            assert torch.equal(apply_repetition_penalty(x, ids, r), want)
        # the whole chain, in transformers' order
        chain = tp.LogitsProcessorList([tp.TemperatureLogitsWarper(0.7), tp.TopKLogitsWarper(20),
                                        tp.TopPLogitsWarper(0.8)])
        got = Sampler(do_sample=True, temperature=0.7, top_k=20, top_p=0.8).warp(x)
        assert torch.equal(got, chain(ids, x))


def test_top_p_keeps_at_least_one_token():
    x = torch.tensor([[10.0, 0.0, -1.0, -2.0]])
    assert torch.isfinite(apply_top_p(x, 1e-9)).sum() == 1
    assert torch.isfinite(apply_top_p(x, 1.0)).sum() == 4


def test_sampler_seeded_draws():
    x = _random_logits(1)
    x = x.repeat(8, 1)  # 32 rows: two seeds drawing the same 32 tokens would be a fluke
    draws = [Sampler(do_sample=True, top_k=0, seed=s)(x) for s in (7, 7, 8)]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])
    assert torch.equal(Sampler()(x), x.argmax(-1))
    assert torch.equal(Sampler(do_sample=True, top_k=1, seed=3)(x), x.argmax(-1))


@pytest.mark.parametrize("kwargs", [
    dict(do_sample=True, temperature=0.0), dict(do_sample=True, temperature=-1.0),
    dict(top_k=-1), dict(top_k=1.5), dict(top_p=0.0), dict(top_p=1.5), dict(top_p=float("nan")),
    dict(repetition_penalty=0.0), dict(seed=-1), dict(seed="x"), dict(do_sample=1),
])
def test_sampler_rejects_bad_arguments(kwargs):
    with pytest.raises(KvcError) as e:
        Sampler(**kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("eos,pad", [(-1, None), (512, None), ([], None), ([1, 2.0], None),
                                     (True, None), (3, 512), (3, [1])])
def test_stopping_rejects_bad_ids(eos, pad):
    with pytest.raises(KvcError) as e:
        Stopping(eos, pad, 2, 512, torch.device("cpu"))
    assert "\n" not in str(e.value)


def test_stopping_pads_finished_rows():
    stop = Stopping([5, 6], 0, 3, 10, torch.device("cpu"))
    assert torch.equal(stop(torch.tensor([5, 1, 2])), torch.tensor([5, 1, 2]))
    assert not stop.done
    assert torch.equal(stop(torch.tensor([3, 6, 2])), torch.tensor([0, 6, 2]))
    assert torch.equal(stop(torch.tensor([3, 3, 5])), torch.tensor([0, 0, 5]))
    assert stop.done
    assert not Stopping(None, None, 3, 10, torch.device("cpu")).done


# --------------------------------------------------------------------------- compiled vs reference


@lru_cache(maxsize=None)
def _model():
    spec = preset("tiny-llama")
    return spec, build_model(spec, "cpu", torch.float32, seed=0)


def _ids(batch=3, prompt=5, seed=0):
    spec, _ = _model()
    return torch.randint(0, spec.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(seed))


@lru_cache(maxsize=None)
def _lowered(mode):
    spec, m = _model()
    return lower(m, forced_plan(mode, spec.num_layers, 8, 8, 64, 0.5, act_chunks=2))


def _compiled(mode, prompt=5, gen=GEN):
    spec, _ = _model()
    plan = forced_plan(mode, spec.num_layers, prompt, gen, 64, 0.5, act_chunks=2)
    return assemble(_lowered(mode), plan, spec, torch.float32, torch.device("cpu"))


SAMPLE = dict(do_sample=True, temperature=1.5, top_k=0)


@pytest.mark.parametrize("mode", MODES)
def test_compiled_sampling(mode):
    spec, m = _model()
    ref = ReferenceDecoder(m, spec)
    ids = _ids()
    cm = _compiled(mode)
    try:
        greedy = cm.generate(ids, GEN)
        assert torch.equal(greedy, ref.generate(ids, GEN))
        # top_k=1 keeps only the argmax: sampling is greedy whatever the seed
        for seed in (0, 1):
            assert torch.equal(cm.generate(ids, GEN, do_sample=True, top_k=1, seed=seed), greedy)
        a = cm.generate(ids, GEN, seed=11, **SAMPLE)
        b = cm.generate(ids, GEN, seed=11, **SAMPLE)
        c = cm.generate(ids, GEN, seed=12, **SAMPLE)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
        assert not torch.equal(a, greedy)
        assert torch.equal(a, ref.generate(ids, GEN, seed=11, **SAMPLE))
        # every warper and the repetition penalty, and the logits of each step
        kw = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3,
                  seed=3)
        tokens, logits = cm.generate(ids, GEN, return_logits=True, **kw)
        ref_tokens, ref_logits = ref.generate(ids, GEN, return_logits=True, **kw)
        assert torch.equal(tokens, ref_tokens)
        assert (logits - ref_logits).abs().max().item() <= 1e-5
        # greedy with a repetition penalty is greedy over the penalized scores, as in transformers
        pen = cm.generate(ids, GEN, repetition_penalty=1.5)
        assert torch.equal(pen, ref.generate(ids, GEN, repetition_penalty=1.5))
        # a batch of one row draws what that row draws alone
        one = cm.generate(ids[:1], GEN, seed=11, **SAMPLE)
        assert torch.equal(one, ref.generate(ids[:1], GEN, seed=11, **SAMPLE))
    finally:
        cm.close()


def test_compiled_rejects_bad_arguments():
    cm = _compiled("pipelined")
    try:
        for kwargs in (dict(max_new_tokens=0), dict(max_new_tokens=2, top_p=0.0),
                       dict(max_new_tokens=2, eos_token_id=10**6)):
            with pytest.raises(KvcError):
                cm.generate(_ids(), **kwargs)
    finally:
        cm.close()


# --------------------------------------------------------------------------- EOS against transformers


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    pytest.importorskip("transformers")
    import hf_fixtures as hf
    from kvc.models import spec_from_hf_config
    from kvc.models.checkpoint import read_config

    model = hf.hf_model("llama2-mha")
    folder = hf.save_checkpoint(model, tmp_path_factory.mktemp("llama2-mha"))
    spec = spec_from_hf_config(read_config(folder))
    return model, spec, build_model(spec, "cpu", torch.float32, checkpoint=folder)


def _hf_generate(model, ids, steps, eos, pad):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=steps, eos_token_id=eos, pad_token_id=pad)


def _counting(cm):
    calls = []
    step = cm.decode_step

    def counted(*args):
        calls.append(1)
        return step(*args)
    cm.decode_step = counted
    return calls


@pytest.mark.parametrize("mode", MODES)
def test_eos_stops_like_transformers(hf_llama, mode):
    hf_model, spec, model = hf_llama
    ref = ReferenceDecoder(model, spec)
    ids = torch.randint(0, spec.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
    steps, p = 16, ids.shape[1]
    greedy = ref.generate(ids, steps)
    new = greedy[:, p:]

    def first_new(row, at):
        """A token row `row` emits at step >= `at` for the first time (an EOS mid-way)."""
        for j in range(at, steps - 1):
            if new[row, j] not in new[row, :j]:
                return int(new[row, j])
        pytest.skip("no fresh token mid-way")

    one = first_new(0, 4)  # row 0 stops mid-way; the others may run to the end
    every = [first_new(r, 3 + 2 * r) for r in range(3)]  # each row stops: the batch ends early
    cm = assemble(lower(model, forced_plan(mode, spec.num_layers, p, steps, 64, 0.5,
                                           act_chunks=2)),
                  forced_plan(mode, spec.num_layers, p, steps, 64, 0.5, act_chunks=2),
                  spec, torch.float32, torch.device("cpu"))
    try:
        calls = _counting(cm)
        assert torch.equal(cm.generate(ids, steps), greedy)
        assert len(calls) == steps - 1
        for eos, pad in ((one, 0), (one, None), (every, 1), (every, None)):
            want = _hf_generate(hf_model, ids, steps, eos, pad)
            ref_tokens = ref.generate(ids, steps, eos_token_id=eos, pad_token_id=pad)
            calls.clear()
            tokens, logits = cm.generate(ids, steps, return_logits=True, eos_token_id=eos,
                                         pad_token_id=pad)
            assert torch.equal(ref_tokens, want), (eos, pad)
            assert torch.equal(tokens, want), (eos, pad)
            n = want.shape[1] - p
            assert logits.shape == (3, n, spec.vocab_size)
            assert len(calls) == n - 1
            if eos is every:
                assert n < steps  # stopped early: fewer decode steps than max_new_tokens
            # the row that emitted EOS carries pads after it
            row = want[0, p:].tolist()
            end = row.index(one if eos is one else next(t for t in row if t in every)) + 1
            assert all(t == (pad if pad is not None else (eos if eos is one else eos[0]))
                       for t in row[end:])
    finally:
        cm.close()

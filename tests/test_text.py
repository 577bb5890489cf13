"""kvc.text: kvc.load's TextModel. The packing rules (sorted batches, left padding, fill rows,
input order, stop strings, per-row budgets, EOS) are checked against a stub model whose
generate is simple enough to read; the rest against a compiled tiny OPT with a real tokenizer."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import kvc
from kvc.errors import KvcError
from kvc.text import Request, TextModel, run_requests

pytest.importorskip("transformers")


# --------------------------------------------------------------------------- the rules, on a stub


class StubModel:
    """generate's contract (left padding, on_token finishing rows, EOS, pads after a finished
    row) with a readable rule: a row's k-th new token is (its real prompt's sum + k) % vocab."""

    def __init__(self, batch_size=4, max_context=64, gen_len=5, vocab=50):
        self.plan = SimpleNamespace(batch_size=batch_size, gen_len=gen_len)
        self.batch_size, self.workload = batch_size, (0, gen_len)
        self.spec = SimpleNamespace(vocab_size=vocab, eos_token_id=())
        self.max_context = max_context
        self.calls = []

    def generate(self, ids, n, on_token=None, *, eos_token_id=None, attention_mask=None, **kw):
        b, p = ids.shape
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask
        assert p + n <= self.max_context
        self.calls.append({"width": p, "rows": b, "n": n, "mask": attention_mask is not None})
        eos = set(eos_token_id or ())
        base = (ids * mask).sum(1)
        live, out = [True] * b, []
        for step in range(n):
            tok = [(int(base[i]) + step) % self.spec.vocab_size if live[i] else 0 for i in range(b)]
            out.append(tok)
            live = [live[i] and tok[i] not in eos for i in range(b)]
            if on_token is not None:
                fin = on_token(step, torch.tensor(tok))
                live = [live[i] and not (fin is not None and fin[i]) for i in range(b)]
            if not any(live):
                break
        return torch.cat([ids, torch.tensor(out).T], 1)


class CharTokenizer:
    """One token per character 'a'..; enough for stop strings."""

    def encode(self, text):
        return [ord(c) - 97 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + i) for i in ids)


def _stub_text_model(**kw):
    m = StubModel(**kw)
    m.tokenizer = CharTokenizer()
    m.complete = lambda *a, **k: TextModel.complete(m, *a, **k)
    return m


def test_batches_sorted_by_length_results_in_input_order():
    m = StubModel(batch_size=2)
    prompts = [[1] * 7, [2] * 2, [3] * 5, [4] * 2, [5] * 9]
    reqs = [Request(p, 3) for p in prompts]
    got = {}
    for idx, comps in run_requests(m, None, reqs):
        got.update(zip(idx, comps))
    assert [c["width"] for c in m.calls] == [2, 7, 9]  # (2, 2), (5, 7), (9 + a fill row)
    assert [c["mask"] for c in m.calls] == [False, True, False]
    assert m.calls[-1]["rows"] == 2  # the last batch filled to the compiled size
    for i, p in enumerate(prompts):
        assert got[i].token_ids == [(sum(p) + k) % 50 for k in range(3)]
        assert got[i].prompt_tokens == len(p) and got[i].finish_reason == "length"


def test_each_row_its_own_budget_and_the_context_cap():
    m = StubModel(batch_size=4, max_context=12)
    reqs = [Request([1] * 3, 2), Request([1] * 3, 6), Request([1] * 4), Request([1] * 9, 8)]
    (idx, comps), = run_requests(m, None, reqs)
    by = dict(zip(idx, comps))
    # the batch is 9 wide: 12 - 9 = 3 tokens at most; the default budget is gen_len (5)
    assert [by[i].completion_tokens for i in range(4)] == [2, 3, 3, 3]
    assert m.calls[0]["n"] == 3


def test_prompt_too_long_names_its_length_and_the_limit():
    m = StubModel(max_context=12)
    with pytest.raises(KvcError, match="prompt 1: 12 tokens; .* at most 12 tokens per row.* at most 11"):
        list(run_requests(m, None, [Request([1] * 3), Request([1] * 12)]))
    assert not m.calls


def test_eos_ends_a_row_and_stays_in_its_tokens():
    m = StubModel(batch_size=2)
    (idx, comps), = run_requests(m, None, [Request([10], 5), Request([20], 5)], eos_token_id=12)
    by = dict(zip(idx, comps))
    assert by[0].token_ids == [10, 11, 12] and by[0].finish_reason == "eos"
    assert by[1].token_ids == [20, 21, 22, 23, 24] and by[1].finish_reason == "length"


def test_stop_strings_cut_the_text_and_end_the_row_early():
    m = _stub_text_model(batch_size=2, gen_len=10)
    # 'b' (1) -> new tokens 1,2,3,...: "bcdefg..."; 'c' (2) -> "cdefgh..."
    out = m.complete(["b", "c"], max_new_tokens=10, stop=["ef", "zz"])
    assert [c.text for c in out] == ["bcd", "cd"]
    assert [c.finish_reason for c in out] == ["stop", "stop"]
    assert [c.token_ids for c in out] == [[1, 2, 3, 4, 5], [2, 3, 4, 5]]
    assert len(m.calls) == 1  # and the batch stopped at the last row's stop, not at 10 tokens


def test_on_text_streams_whole_text_and_holds_back_a_possible_stop():
    m = _stub_text_model(batch_size=1, gen_len=10)
    pieces = []
    out = m.complete("b", max_new_tokens=8, stop="fgx", on_text=lambda i, t: pieces.append(t))
    assert "".join(pieces) == out[0].text == "bcdefghi" and out[0].finish_reason == "length"
    pieces.clear()
    out = m.complete("b", max_new_tokens=8, stop="de", on_text=lambda i, t: pieces.append(t))
    assert "".join(pieces) == out[0].text == "bc"


def test_prompt_forms_and_bad_settings():
    m = _stub_text_model(batch_size=2)
    a = m.complete("bc", max_new_tokens=2)
    assert m.complete([1, 2], max_new_tokens=2)[0].token_ids == a[0].token_ids
    assert len(m.complete(["bc", [1, 2], "d"], max_new_tokens=2)) == 3
    for bad, needle in [([], "non-empty"), ([[]], "empty"), ([1.5], "expected a text"),
                        ([[1, 99]], "outside the vocabulary")]:
        with pytest.raises(KvcError, match=needle):
            m.complete(bad)
    with pytest.raises(KvcError, match="unknown generation setting 'temprature'"):
        m.complete("b", temprature=0.5)
    with pytest.raises(KvcError, match="stop"):
        m.complete("b", stop=[""])
    with pytest.raises(KvcError, match="eos_token_id"):
        m.complete("b", eos_token_id=[50])


# --------------------------------------------------------------------------- a real model


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    from text_fixtures import compile_text_artifact

    return compile_text_artifact(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def model(art):
    m = kvc.load(art, device="cpu")
    yield m
    m.close()


def test_load_is_a_compiled_model_with_a_tokenizer(model, tmp_path):
    assert isinstance(model, kvc.CompiledModel) and isinstance(model, kvc.TextModel)
    assert model.tokenizer is not None and model.tokenizer.decode(model.tokenizer.encode("the cat")) == "the cat"
    tiny = {"model": {"preset": "tiny-opt", "dtype": "float32"}, "hardware": "cpu",
            "workload": {"batch_size": 2, "prompt_len": 8, "gen_len": 4}}
    m = kvc.load(kvc.compile(tiny, ["schedule.recompute_fraction=0.5"], output=tmp_path / "d.kvc"),
                 device="cpu")
    assert m.tokenizer is None
    with pytest.raises(KvcError, match="needs a tokenizer"):
        m.generate_text("hi")
    assert m.complete([[1, 2, 3]], max_new_tokens=2)[0].text is None


def _alone(model, ids, n):
    """The row decoded on its own (a batch of copies: no padding anywhere)."""
    b = model.plan.batch_size
    return model.generate(torch.tensor([ids] * b), n)[0, len(ids):].tolist()


def test_equal_length_texts_match_generate(model):
    tok = model.tokenizer
    prompts = ["the cat sat", "the mat sat", "the cat ran", "a cat sat"]  # 6 tokens each
    assert len({len(tok.encode(p)) for p in prompts}) == 1
    out = model.complete(prompts, max_new_tokens=6)
    ids = torch.tensor([tok.encode(p) for p in prompts])
    want = model.generate(ids, 6)[:, ids.shape[1]:].tolist()
    assert [c.token_ids for c in out] == want
    assert [c.text for c in out] == [tok.decode(w) for w in want]
    assert model.generate_text(prompts, max_new_tokens=6) == [c.text for c in out]


def test_mixed_lengths_equal_each_prompt_alone(model):
    """Waits on generate's attention_mask (left padding) support."""
    tok = model.tokenizer
    prompts = ["the cat sat on the mat", "a", "kv caches live on the cpu and the dog ran",
               "café crème", "日本語", "numbers 0 1 2 3", "the", "emoji 🙂 and ✓ marks"]
    out = model.complete(prompts, max_new_tokens=5)
    for p, c in zip(prompts, out):
        assert c.prompt_tokens == len(tok.encode(p))
        assert c.token_ids == _alone(model, tok.encode(p), 5), p


def test_eos_stops_a_row(model):
    ids = model.tokenizer.encode("the cat sat")
    free = model.complete([ids], max_new_tokens=6, eos_token_id=())[0]
    eos = free.token_ids[2]
    k = free.token_ids.index(eos)
    c = model.complete([ids], max_new_tokens=6, eos_token_id=[eos])[0]
    assert c.finish_reason == "eos" and c.token_ids == free.token_ids[:k + 1]
    assert c.text == model.tokenizer.decode(free.token_ids[:k])


def test_stop_string_on_the_real_tokenizer(model):
    ids = model.tokenizer.encode("the cat sat")
    free = model.complete([ids], max_new_tokens=8)[0]
    stop = free.text[len(free.text) // 2:][:2]
    assert stop
    c = model.complete([ids], max_new_tokens=8, stop=stop)[0]
    assert c.finish_reason == "stop" and c.text == free.text[:free.text.find(stop)]
    assert free.token_ids[:len(c.token_ids)] == c.token_ids


def test_length_capped_by_max_context(model):
    cap = model.max_context
    ids = [5] * (cap - 3)
    c = model.complete([ids], max_new_tokens=50)[0]
    assert c.completion_tokens == 3 and c.finish_reason == "length"
    with pytest.raises(KvcError, match=f"{cap} tokens"):
        model.complete([[5] * cap])


def test_sampling_reproducible_and_top_k_1_is_greedy(model):
    p = ["the cat sat", "a dog ran"]
    a = model.complete(p, max_new_tokens=6, do_sample=True, seed=3, temperature=1.5)
    b = model.complete(p, max_new_tokens=6, do_sample=True, seed=3, temperature=1.5)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    greedy = model.complete(p, max_new_tokens=6)
    assert [c.token_ids for c in model.complete(p, max_new_tokens=6, do_sample=True, top_k=1,
                                                seed=1)] == [c.token_ids for c in greedy]


def test_chat_messages_use_the_template(model):
    pytest.importorskip("jinja2")
    if not hasattr(model.tokenizer, "apply_chat_template"):
        pytest.fail("kvc.tokenizer has no apply_chat_template yet")
    chat = [{"role": "user", "content": "the cat sat"}]
    ids = model.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    assert model.tokenizer.decode(ids).endswith("assistant\n")
    assert model.complete(chat, max_new_tokens=3)[0].token_ids == model.complete([ids], max_new_tokens=3)[0].token_ids
    assert len(model.complete([chat, chat, "x"], max_new_tokens=2)) == 3


def test_streamed_text_is_the_final_text(model):
    """The pieces on_text hands over join to the completion's text, for sampled runs whose
    tokens split characters (byte-level BPE); none ends in half a character."""
    for seed in range(4):
        pieces = []
        c = model.complete("日本語 café 🙂", max_new_tokens=8, do_sample=True, seed=seed,
                           on_text=lambda i, t, pieces=pieces: pieces.append(t))[0]
        assert "".join(pieces) == c.text
        assert not any(p.endswith("\ufffd") for p in pieces[:-1])

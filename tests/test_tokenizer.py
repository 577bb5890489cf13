"""kvc.tokenizer: streaming that never garbles a character spanning tokens (byte-level BPE as
GPT-2/OPT, Llama 3 and Qwen2 use it; SentencePiece byte fallback as Llama 2's), and the
checkpoint's chat template. Tokenizers are trained in code (tests/tokenizer_fixtures.py)."""
import random
import sys

import pytest

pytest.importorskip("tokenizers")

from tokenizer_fixtures import CHATML, RARE, WORDS, random_prompt, save_tokenizer

from kvc.errors import KvcError
from kvc.tokenizer import Tokenizer, check_messages, load_tokenizer

KINDS = ("gpt2", "llama3", "llama2")
FFFD = "\ufffd"


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    return {k: load_tokenizer(save_tokenizer(k, tmp_path_factory.mktemp(k))) for k in KINDS}


def stream(tok, ids, rng=None, context=()):
    """The chunks a stream decoder emits for ids fed one at a time (or in random pieces)."""
    d = tok.stream_decoder(context)
    chunks, i = [], 0
    while i < len(ids):
        n = 1 if rng is None else rng.choice([1, 1, 1, 2, 3, 5])
        chunks.append(d.add(ids[i:i + n]))
        i += n
    chunks.append(d.finish())
    return chunks


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_prompts_are_never_garbled(toks, kind):
    tok, rng = toks[kind], random.Random(kind)
    naive_garbled = 0
    for _ in range(150):
        text = random_prompt(rng)
        ids = tok.encode(text)
        full = tok.decode(ids)
        assert FFFD not in full
        naive_garbled += FFFD in "".join(tok.decode([i]) for i in ids)
        for pieces in (None, rng):
            chunks = stream(tok, ids, pieces)
            assert "".join(chunks) == full
            assert not any(FFFD in c for c in chunks), (text, chunks)
    # the prompts do exercise characters that span tokens (the issue saw 30-42 of 150)
    assert naive_garbled >= 30


@pytest.mark.parametrize("kind", KINDS)
def test_text_is_emitted_once_its_character_is_complete(toks, kind):
    tok = toks[kind]
    text = "ab " + RARE[:4] + " cd"
    ids = tok.encode(text)
    d = tok.stream_decoder()
    out = []
    full = tok.decode(ids)
    for i in ids:
        out.append(d.add([i]))
        # nothing garbled, nothing taken back; and nothing held once the ids so far decode to
        # whole characters (with byte fallback: and the last id is not a byte, since a run of
        # bytes decodes as a whole: valid UTF-8, or U+FFFD for each byte)
        so_far = tok.decode(ids[:len(out)])
        assert full.startswith("".join(out)) and FFFD not in "".join(out)
        if not so_far.endswith(FFFD) and i not in tok._run_ids():
            assert "".join(out) == so_far
    out.append(d.finish())
    assert "".join(out) == full and out[-1] == ""


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_ids_stream_as_decode_writes_them(toks, kind):
    """Any id sequence (a model may sample lone bytes, special tokens, an unfinished
    character at the end): the chunks join to decode(ids), an add() never ends in U+FFFD,
    and U+FFFD appears only where decode() itself has it."""
    tok, rng = toks[kind], random.Random(7)
    vocab = tok._t.get_vocab_size()
    real = [tok.encode(random_prompt(rng)) for _ in range(20)]
    for n in range(300):
        if n % 3 == 0:
            ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 40))]
        else:  # real text with random ids spliced in
            ids = list(rng.choice(real))
            for _ in range(rng.randint(1, 4)):
                ids.insert(rng.randint(0, len(ids)), rng.randrange(vocab))
        chunks = stream(tok, ids, rng if n % 2 else None)
        full = tok.decode(ids)
        assert "".join(chunks) == full, (ids, chunks)
        assert not any(c.endswith(FFFD) for c in chunks[:-1])
        assert sum(c.count(FFFD) for c in chunks) == full.count(FFFD)


@pytest.mark.parametrize("kind", KINDS)
def test_context_ids_are_read_not_emitted(toks, kind):
    tok, rng = toks[kind], random.Random(3)
    for _ in range(50):
        prompt, gen = tok.encode(random_prompt(rng)), tok.encode(random_prompt(rng))[1:]
        head = tok.decode(prompt)
        whole = tok.decode(prompt + gen)
        chunks = stream(tok, gen, rng, context=prompt)
        assert not any(FFFD in c for c in chunks)
        if whole.startswith(head):
            assert "".join(chunks) == whole[len(head):]


def test_byte_runs_are_held_only_with_byte_fallback(toks):
    assert toks["gpt2"]._run_ids() == toks["llama3"]._run_ids() == frozenset()
    runs = toks["llama2"]._run_ids()
    t = toks["llama2"]._t
    assert {t.token_to_id(f"<0x{b:02X}>") for b in range(256)} | {t.token_to_id("</s>")} <= runs
    assert t.token_to_id("▁the") not in runs
    # a byte that turns a finished run invalid: decode() writes every byte of the run as
    # U+FFFD, so the "k" before it must not have been emitted on its own
    k, c6, word = t.token_to_id("<0x6B>"), t.token_to_id("<0xC6>"), t.encode("the", add_special_tokens=False).ids
    ids = word + [k, c6] + word
    chunks = stream(toks["llama2"], ids)
    assert "".join(chunks) == toks["llama2"].decode(ids) and "k" not in "".join(chunks)


def test_special_tokens_are_skipped_as_decode_skips_them(toks):
    tok = toks["llama2"]
    eos = tok._t.token_to_id("</s>")
    ids = tok.encode("hello 中文") + [eos] + tok.encode("world")[1:]
    assert "".join(stream(tok, ids)) == tok.decode(ids)
    assert "</s>" not in tok.decode(ids)


def test_stream_decoder_api(toks):
    import numpy as np

    tok = toks["gpt2"]
    ids = tok.encode("café 😀")
    d = tok.stream_decoder()
    got = d.add(np.array(ids[:2])) + "".join(d.add(int(i)) for i in ids[2:])
    got += d.finish()
    assert got == d.text == tok.decode(ids)
    assert d.finish() == ""
    with pytest.raises(KvcError, match="after finish"):
        d.add([1])
    with pytest.raises(KvcError, match="token id -1"):
        tok.stream_decoder().add([-1])
    with pytest.raises(KvcError, match="token id 'a'"):
        tok.stream_decoder().add(["a"])


@pytest.mark.parametrize("kind", ["llama3", "llama2"])
def test_transformers_backend_streams_the_same(toks, tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    folder = save_tokenizer(kind, tmp_path / "t")
    hf = Tokenizer(transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True),
                   "transformers", folder)
    assert hf._run_ids() == toks[kind]._run_ids()
    rng = random.Random(5)
    for _ in range(50):
        ids = toks[kind].encode(random_prompt(rng))
        chunks = stream(hf, ids, rng)
        assert "".join(chunks) == hf.decode(ids) == toks[kind].decode(ids)
        assert not any(FFFD in c for c in chunks)


# --------------------------------------------------------------------------- chat templates

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "中文 😀 café?"}]


@pytest.mark.parametrize("template_file", [False, True], ids=["tokenizer_config", "jinja_file"])
def test_chat_template_matches_transformers(tmp_path, template_file):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("jinja2")
    folder = save_tokenizer("llama3", tmp_path / "chat", chat_template=CHATML, template_file=template_file)
    tok = load_tokenizer(folder)
    ids = tok.apply_chat_template(MESSAGES)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    want = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if not isinstance(want, list) else want
    assert ids == list(want)
    assert tok.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n中文 😀 café?"
                               "<|im_end|>\n<|im_start|>assistant\n").replace("<|im_start|>", "").replace(
                                   "<|im_end|>", "")
    no_prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=False)
    assert ids[:len(no_prompt)] == no_prompt and len(ids) > len(no_prompt)


def test_no_chat_template_is_one_line(toks):
    with pytest.raises(KvcError, match="has no chat template") as e:
        toks["gpt2"].apply_chat_template(MESSAGES)
    assert "\n" not in str(e.value)


def test_chat_template_without_transformers(tmp_path, monkeypatch):
    folder = save_tokenizer("gpt2", tmp_path / "c", chat_template=CHATML)
    tok = load_tokenizer(folder)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(KvcError, match=r"^chat templates need transformers \(pip install transformers\)$"):
        tok.apply_chat_template(MESSAGES)


def test_a_failing_template_is_one_line(tmp_path):
    pytest.importorskip("transformers")
    bad = "{{ raise_exception('only user and assistant roles') }}"
    tok = load_tokenizer(save_tokenizer("gpt2", tmp_path / "b", chat_template=bad))
    with pytest.raises(KvcError, match="chat template failed.*only user and assistant roles"):
        tok.apply_chat_template(MESSAGES)


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    (None, "non-empty list"),
    (["hello"], r"messages\[0\]: expected"),
    ([{"role": "user"}], r"messages\[0\]\.content: expected a string"),
    ([{"role": "user", "content": "a"}, {"role": 3, "content": "b"}], r"messages\[1\]\.role"),
    ([{"role": "user", "contents": "a"}], r"unknown keys \['contents'\]"),
    ([{"role": "", "content": "a"}], "role: empty"),
])
def test_bad_messages(messages, match):
    with pytest.raises(KvcError, match=match):
        check_messages(messages)


def test_words_cover_multibyte_text():
    assert sum(len(w.encode()) > len(w) for w in WORDS) > len(WORDS) // 2

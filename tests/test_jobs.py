"""JSONL batch jobs (kvc.jobs, `kvc run ART --input --output`): input order, resume after an
interruption, malformed lines, stdin/stdout. Against a compiled tiny OPT with a tokenizer."""
from __future__ import annotations

import io
import json
import random
import sys

import pytest
import torch

import kvc
from kvc.cli import main
from kvc.errors import KvcError
from kvc.jobs import parse, run_job

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    from text_fixtures import compile_text_artifact

    return compile_text_artifact(tmp_path_factory.mktemp("jobs"), batch_size=8)


@pytest.fixture(scope="module")
def model(art):
    m = kvc.load(art, device="cpu")
    yield m
    m.close()


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def hundred(tmp_path_factory, art):
    """100 prompts of 3..300 tokens (ids, texts, one chat), run once as the reference."""
    rng = random.Random(0)
    records = []
    for k in range(100):
        n = 3 + (k * 297) // 99  # 3 .. 300, every length class
        rec = {"id": k, "prompt_ids": [rng.randrange(300) for _ in range(n)]}
        if k % 10 == 3:
            rec = {"id": k, "prompt": "the cat sat on the mat " * (k // 10 + 1)}
        if k == 50:
            rec["max_new_tokens"] = 2
        records.append(rec)
    rng.shuffle(records)
    d = tmp_path_factory.mktemp("hundred")
    inp = _write(d / "in.jsonl", records)
    assert main(["run", str(art), "--input", str(inp), "--output", str(d / "out.jsonl"),
                 "--window", "24"]) == 0
    return inp, d / "out.jsonl", records


def test_hundred_prompts_in_input_order(hundred, model):
    """Waits on generate's attention_mask (left padding) for the mixed-length batches."""
    _, out, records = hundred
    lines = _lines(out)
    assert [line["id"] for line in lines] == [r["id"] for r in records]
    for line, rec in zip(lines, records):
        assert {k: line[k] for k in rec} == rec  # the input's fields kept
        want = 2 if rec.get("max_new_tokens") == 2 else model.plan.gen_len
        assert line["completion_tokens"] == len(line["token_ids"]) == want
        assert line["finish_reason"] == "length"
        ids = rec.get("prompt_ids") or model.tokenizer.encode(rec["prompt"])
        assert line["prompt_tokens"] == len(ids)
        assert line["text"] == model.tokenizer.decode(line["token_ids"])
    # a sample of rows against each decoded on its own
    for line, rec in list(zip(lines, records))[::17]:
        ids = rec.get("prompt_ids") or model.tokenizer.encode(rec["prompt"])
        n = line["completion_tokens"]
        alone = model.generate(torch.tensor([ids] * model.plan.batch_size), n)[0, len(ids):]
        assert line["token_ids"] == alone.tolist(), rec["id"]
    assert not out.with_name("out.jsonl.partial").exists()


def test_resume_after_a_torn_write(hundred, art, tmp_path, capsys):
    """An output killed mid-line: k whole lines (the first one marked, so a redo would show)
    and half of the next; --resume keeps the k, redoes the rest, and renames at the end."""
    inp, ref, _ = hundred
    lines = ref.read_text().splitlines(keepends=True)
    first = json.loads(lines[0])
    first["text"] = "KEPT"
    partial = tmp_path / "out.jsonl.partial"
    partial.write_text(json.dumps(first) + "\n" + "".join(lines[1:37]) + lines[37][:20])
    out = tmp_path / "out.jsonl"
    assert main(["run", str(art), "--input", str(inp), "--output", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "half-written" in err and "37 already done" in err and "63 prompts" in err
    got = out.read_text().splitlines(keepends=True)
    assert json.loads(got[0])["text"] == "KEPT" and got[1:] == lines[1:]
    assert not partial.exists()


def test_interrupted_job_keeps_finished_windows_and_resumes(hundred, model, tmp_path, monkeypatch):
    inp, ref, _ = hundred
    out = tmp_path / "out.jsonl"
    calls = {"n": 0}
    real = model.generate

    def dies_on_the_5th(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(model, "generate", dies_on_the_5th)
    with pytest.raises(KeyboardInterrupt):  # windows of 16 = 2 batches: 2 windows written
        run_job(model, str(inp), str(out), window=16)
    monkeypatch.undo()
    partial = tmp_path / "out.jsonl.partial"
    assert not out.exists()
    assert partial.read_text() == "".join(ref.read_text().splitlines(keepends=True)[:32])
    with pytest.raises(KvcError, match="interrupted job: pass --resume"):
        run_job(model, str(inp), str(out))
    s = run_job(model, str(inp), str(out), resume=True, window=16)
    assert (s.resumed, s.prompts) == (32, 68)
    assert out.read_text() == ref.read_text() and not partial.exists()
    s = run_job(model, str(inp), str(out), resume=True)  # a whole output: nothing to do
    assert (s.resumed, s.prompts, s.tokens) == (100, 0, 0) and out.read_text() == ref.read_text()


def test_resume_refuses_an_output_of_another_input(art, tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"prompt": "the cat"}, {"prompt": "a dog"}])
    b = _write(tmp_path / "b.jsonl", [{"prompt": "the cat"}, {"prompt": "a cow"}])
    out = tmp_path / "o.jsonl"
    assert main(["run", str(art), "--input", str(a), "--output", str(out), "--max-new-tokens", "2"]) == 0
    out.rename(tmp_path / "o.jsonl.partial")
    assert main(["run", str(art), "--input", str(b), "--output", str(out), "--resume"]) == 2
    assert (tmp_path / "o.jsonl.partial").read_text().count("\n") == 2


BAD = [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"text": "x"}, "exactly one of"),
    ({"prompt": "a", "prompt_ids": [1]}, "got prompt and prompt_ids"),
    ({"prompt": 5}, "'prompt' must be a string"),
    ({"prompt_ids": [1, "2"]}, "list of integers"),
    ({"prompt_ids": [1, 300]}, "outside the vocabulary"),
    ({"prompt_ids": [1] * 400}, "400 tokens"),
    ({"messages": "hi"}, "'messages' must be"),
    ({"prompt": ""}, "empty"),
    ({"prompt": "a", "max_new_tokens": 0}, "'max_new_tokens' = 0"),
    ({"prompt": "a", "temperature": 0.5}, "job-wide setting"),
    ({"prompt": "a", "finish_reason": "x"}, "one kvc writes"),
    ({"prompt": "a", "stop": [1]}, "stop"),
]


@pytest.mark.parametrize("line, needle", BAD, ids=[n for _, n in BAD])
def test_malformed_lines(model, line, needle):
    with pytest.raises(KvcError, match=needle):
        parse(line if isinstance(line, str) else json.dumps(line), model, model.tokenizer)


def test_on_error_fail_names_the_line_and_writes_nothing(art, tmp_path, capsys):
    inp = _write(tmp_path / "in.jsonl", [{"prompt": "the cat"}, "", {"prompt": 3}, "{oops"])
    out = tmp_path / "o.jsonl"
    assert main(["run", str(art), "--input", str(inp), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"kvc: error: {inp}:3: 'prompt' must be a string")
    assert "1 more bad lines" in err[0]
    assert not out.exists() and not (tmp_path / "o.jsonl.partial").exists()


def test_on_error_skip_keeps_output_aligned(art, tmp_path, capsys):
    inp = _write(tmp_path / "in.jsonl", [{"prompt": "the cat", "id": 1}, {"prompt": 3, "id": 2},
                                         "{oops", {"prompt_ids": [5, 6], "id": 4}])
    out = tmp_path / "o.jsonl"
    assert main(["run", str(art), "--input", str(inp), "--output", str(out), "--on-error", "skip",
                 "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert f"{inp}:2: 'prompt' must be a string" in err and f"{inp}:3: not JSON" in err
    assert "2 skipped" in err
    lines = _lines(out)
    assert len(lines) == 4
    assert lines[1] == {"prompt": 3, "id": 2, "error": "'prompt' must be a string, got int"}
    assert lines[2]["input"] == "{oops" and "not JSON" in lines[2]["error"]
    assert lines[0]["completion_tokens"] == 2 and lines[3]["prompt_tokens"] == 2


def test_stdin_to_stdout(art, monkeypatch, capsys):
    data = b'{"prompt": "the cat"}\n{"messages": [{"role": "user", "content": "hi"}]}\n'
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert main(["run", str(art), "--input", "-", "--output", "-", "--max-new-tokens", "3",
                 "--stop", "zzz"]) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(x) for x in out.splitlines()]
    assert [line.get("prompt") for line in lines] == ["the cat", None]
    assert all(line["completion_tokens"] == 3 for line in lines)
    assert "2 prompts" in err and "tokens/s" in err and "prompts/s" in err


@pytest.mark.parametrize("argv, needle", [
    (["--input", "x.jsonl"], "--input needs --output"),
    (["--output", "o.jsonl"], "belong to a JSONL job"),
    (["--input", "-", "--output", "-", "--resume"], "--resume needs an output file"),
    (["--input", "nope.jsonl", "--output", "o.jsonl"], "cannot read it"),
    (["--input", "x.jsonl", "--output", "o", "--prompt", "hi"], "without --prompt"),
])
def test_job_argument_errors(art, argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"prompt": "a"}\n')))
    assert main(["run", str(art), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvc: error:") and needle in err[0], err


# --------------------------------------------------------------------------- kvc run's other inputs


def test_prompts_file_from_stdin_in_order(art, model, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"the cat sat on the mat\n\na dog\n")))
    assert main(["run", str(art), "--prompts-file", "-", "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    want = model.complete(["the cat sat on the mat", "a dog"], max_new_tokens=3)
    assert out == "".join(f"{p}{c.text}\n" for p, c in zip(["the cat sat on the mat", "\na dog"], want))
    assert "6 tokens in" in err and "finished by length" in err


def test_streamed_prompt_with_stop_and_sampling(art, model, capsys):
    free = model.complete("the cat", max_new_tokens=8, do_sample=True, seed=5, temperature=1.3)[0]
    stop = free.text[3:5]
    assert main(["run", str(art), "--prompt", "the cat", "--max-new-tokens", "8", "--do-sample",
                 "--seed", "5", "--temperature", "1.3", "--stop", stop]) == 0
    out, err = capsys.readouterr()
    assert out == "the cat" + free.text[:free.text.find(stop)] + "\n"
    assert "finished by stop" in err


def test_eos_flag(art, model, capsys):
    ids = model.tokenizer.encode("the cat")
    free = model.complete([ids], max_new_tokens=6)[0].token_ids
    assert main(["run", str(art), "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", "6",
                 "--eos-token-id", f"{free[1]},{free[1]}"]) == 0
    out, err = capsys.readouterr()
    assert out.split() == list(map(str, free[:free.index(free[1]) + 1])) and "finished by eos" in err
    assert main(["run", str(art), "--prompt-ids", "1,2", "--eos-token-id", "x"]) == 2
    assert "--eos-token-id 'x'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--prompt", "a", "--do-sample", "--temperature", "0"], "temperature = 0.0"),
    (["--prompt", "a", "--top-p", "2"], "top_p = 2.0"),
    (["--stop", "x"], "--stop needs text"),
    (["--prompt", "x" * 2000], "tokens per row"),
])
def test_run_flag_errors(art, argv, needle, capsys):
    assert main(["run", str(art), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvc: error:") and needle in err[0], err

"""kvc as people use it (issue 7): text in and out, progress bars, the predicted timeline,
`kvc bench --trace` and `kvc inspect`. Bad input lives in test_bad_input.py."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kvc
from kvc import progress
from kvc.planner import cost
from kvc.cli import main
from kvc.errors import KvcError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = {"model": {"preset": "tiny-opt", "dtype": "float32"}, "hardware": "cpu",
        "workload": {"batch_size": 2, "prompt_len": 8, "gen_len": 8}}
CORPUS = ["the cat sat on the mat", "a dog ran in the park", "kv caches live on the cpu"] * 20


# --------------------------------------------------------------------------- timeline


@pytest.mark.parametrize("lookahead, chunks", [(0, 1), (1, 1), (1, 4)])
def test_intervals_are_simulates_schedule(lookahead, chunks):
    """The picture ends when `simulate` says the step ends, and no stream runs two things at once."""
    rng = np.random.default_rng(lookahead * 10 + chunks)
    for _ in range(20):
        A, K, R, C, D = (rng.uniform(0, 2, 6) * (rng.uniform(size=6) > 0.2) for _ in range(5))
        head = float(rng.uniform(0, 1))
        step, _, _ = cost.simulate(*(x[:, None] for x in (A, K, R, C, D)), head, lookahead, chunks)
        items = cost.intervals(A, K, R, C, D, head, lookahead, chunks)
        assert max(max(it["end"] for it in items), 0) == pytest.approx(float(step[0]))
        for lane in ("copy-in", "compute", "copy-out"):
            spans = sorted((it["start"], it["end"]) for it in items if it["lane"] == lane)
            assert all(a[1] <= b[0] + 1e-9 for a, b in zip(spans, spans[1:])), lane
        busy = {k: sum(it["end"] - it["start"] for it in items if it["kind"] == k)
                for k in ("act_copy", "kv_copy", "recompute", "compute", "writeback")}
        for kind, arr in zip(busy, (A, K, R, C, D)):
            assert busy[kind] == pytest.approx(arr.sum())


def _plan(mode="pipelined", fraction=0.5, hardware="cpu"):
    from kvc.api import make_plan, resolve

    r = resolve(TINY, [f"schedule.mode={mode}", f"schedule.recompute_fraction={fraction}",
                       f"hardware={hardware}"])
    return r, make_plan(r)


def test_predicted_intervals_by_kind_and_step_time():
    from kvc.planner.scheduler import predict
    from kvc.reports.timeline import chrome_trace, predicted_intervals

    r, plan = _plan(hardware="h100-pcie5")
    assert plan.offloaded
    items = predicted_intervals(r.spec, r.hardware, plan, 8, 2, "float32")
    assert {it["kind"] for it in items} == {"act_copy", "kv_copy", "recompute", "compute",
                                            "writeback", "head"}
    pred = predict(r.spec, r.hardware, plan, 8, 2, "float32")
    # predict() also bounds the step by the host issuing nodes; the streams alone fit inside it
    assert max(it["end"] for it in items) <= pred["predicted_step_ms"] + 1e-9
    trace = chrome_trace(items)
    assert sum(e["ph"] == "X" for e in trace["traceEvents"]) == len(items)


def test_resident_plan_has_no_copies():
    from kvc.reports.timeline import predicted_intervals

    r, plan = _plan(mode="gpu_resident")
    items = predicted_intervals(r.spec, r.hardware, plan, 8, 2, "float32")
    assert {it["kind"] for it in items} == {"compute", "head"}


def test_draw_png(tmp_path):
    pytest.importorskip("matplotlib")
    from kvc.reports.timeline import draw, predicted_intervals

    r, plan = _plan()
    out = draw(predicted_intervals(r.spec, r.hardware, plan, 8, 2, "float32"), tmp_path / "t.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_draw_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    from kvc.reports.timeline import draw

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    with pytest.raises(KvcError, match=r"pip install 'kvc\[plot\]'"):
        draw([], tmp_path / "t.png")


# --------------------------------------------------------------------------- progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_off_by_default_in_the_api(tmp_path, monkeypatch):
    fake = _Tty()
    monkeypatch.setattr(sys, "stderr", fake)
    kvc.compile(TINY, ["schedule.recompute_fraction=0.5"], output=tmp_path / "a.kvc")
    assert fake.getvalue() == ""
    with progress.enabled(True):
        kvc.compile(TINY, ["schedule.recompute_fraction=0.5"], output=tmp_path / "b.kvc")
    assert "kvc: compiling" in fake.getvalue()


@pytest.mark.parametrize("tqdm_present", [True, False])
def test_bar_draws_only_on_a_terminal(monkeypatch, tqdm_present):
    if not tqdm_present:
        monkeypatch.setitem(sys.modules, "tqdm", None)
    elif not _has("tqdm"):
        pytest.skip("tqdm not installed")
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    with progress.enabled(True):
        with progress.bar("kvc: x", total=3) as b:
            b.update()
    assert piped.getvalue() == ""
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    with progress.enabled(True):
        with progress.bar("kvc: x", total=3) as b:
            for _ in range(3):
                b.update()
    assert "kvc: x" in tty.getvalue() and "3/3" in tty.getvalue()


def _has(mod):
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


# --------------------------------------------------------------------------- tokenizer + run


def _tokenizer_json(folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_tokenizer_roundtrip_and_missing(tmp_path):
    from kvc.tokenizer import load_tokenizer

    tok = load_tokenizer(_tokenizer_json(tmp_path))
    ids = tok.encode("the cat ran")
    assert ids and max(ids) < 300 and tok.decode(ids) == "the cat ran"
    (tmp_path / "none").mkdir()
    with pytest.raises(KvcError, match="has no tokenizer"):
        load_tokenizer(tmp_path / "none")


@pytest.fixture(scope="module")
def text_artifact(tmp_path_factory):
    """A tiny OPT checkpoint with a tokenizer.json, compiled for any prompt length."""
    pytest.importorskip("transformers")
    from hf_fixtures import hf_model, save_checkpoint

    root = tmp_path_factory.mktemp("text")
    ckpt = _tokenizer_json(save_checkpoint(hf_model("opt-preln"), root / "ckpt"))
    cfg = {"model": {"checkpoint": str(ckpt), "dtype": "float32"}, "hardware": "cpu",
           "workload": {"batch_size": 1, "prompt_len": 4, "gen_len": 8}}
    return kvc.compile(cfg, ["schedule.recompute_fraction=0.5"], output=root / "t.kvc"), ckpt


def test_run_streams_the_checkpoints_text(text_artifact, capsys):
    from kvc.tokenizer import load_tokenizer

    art, ckpt = text_artifact
    assert main(["run", str(art), "--prompt", "the cat sat", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    tok = load_tokenizer(ckpt)
    ids = tok.encode("the cat sat")
    want = kvc.load(art, device="cpu").generate(torch.tensor([ids]), 6)[0, len(ids):].tolist()
    assert out == "the cat sat" + tok.decode(want) + "\n"
    assert "6 tokens in" in err and "tokens/s" in err and "meaningless" not in err


def test_run_prompts_file(text_artifact, tmp_path, capsys):
    art, _ = text_artifact
    f = tmp_path / "p.txt"
    f.write_text("the cat\n\na dog ran\n")
    assert main(["run", str(art), "--prompts-file", str(f), "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    blocks = out.strip("\n").split("\n\n")
    assert [b.split("\n")[0][:7] for b in blocks] == ["the cat", "a dog r"]
    assert "6 tokens in" in err


def test_run_dummy_text_prompt_falls_back_to_ids(tmp_path, capsys):
    art = kvc.compile(TINY, ["schedule.recompute_fraction=0.5"], output=tmp_path / "d.kvc")
    assert main(["run", str(art), "--prompt", "hi!", "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("104 105 33 |") and len(out.split("|")[1].split()) == 3
    assert "meaningless" in err


# --------------------------------------------------------------------------- plan / bench / inspect


def test_plan_timeline_cli(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plan.png"
    assert main(["plan", str(EXAMPLES / "tiny-llama.yaml"), "--timeline", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().err


def test_bench_trace_is_one_decode_step(tmp_path, capsys):
    d = tmp_path / "trace"
    assert main(["bench", str(EXAMPLES / "tiny-opt.yaml"), "--trace", str(d),
                 "schedule.recompute_fraction=0.5"]) == 0
    measured = json.loads((d / "decode_step.json").read_text())["traceEvents"]
    # one step: one argmax over the logits, no prefill (which would run the embedding on 16 tokens)
    assert sum(e.get("name") == "aten::argmax" for e in measured) == 1
    predicted = json.loads((d / "predicted.json").read_text())["traceEvents"]
    assert {e.get("cat") for e in predicted if e["ph"] == "X"} >= {"act_copy", "recompute", "compute"}


def test_inspect_matches_plan(tmp_path, capsys):
    cfg = EXAMPLES / "opt-6.7b-h100.yaml"
    art = tmp_path / "o.kvc"
    assert main(["compile", str(cfg), "-o", str(art), "hardware.gpu_mem_gb=20"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(art)]) == 0
    text = capsys.readouterr().out
    for needle in ("opt, 32 layers", "h100-pcie5 (cuda)", "/32 layers offloaded", "dummy weights",
                   "batch 32, prompt 1024"):
        assert needle in text, text
    assert main(["plan", str(cfg), "--json", "hardware.gpu_mem_gb=20"]) == 0
    plan = json.loads(capsys.readouterr().out)
    for mode in ("kvpr", "full_offload"):
        ms = plan["modes"][mode]["predicted_step_ms"]
        assert f"{mode:<13} {ms:>10.3f} ms   x{ms / plan['predicted_step_ms']:.2f}" in text
    assert "gpu_resident  infeasible" in text


def test_plan_text_names_the_host_lane_and_when_it_binds():
    """`kvc plan` says how long the host takes to issue the step, and says so when that, not
    the link or the GPU, sets the step (small batch on a slow host)."""
    from kvc.models import PRESETS
    from kvc.ir.request import PlanRequest
    from kvc.reports.plan import plan_text
    from kvc_fixtures import hw

    # batch 32 at 1024 with room for little of the cache: the link sets the step
    kw = PlanRequest(batch_size=32, prompt_len=1024, gen_len=8, dtype="float16", mode="pipelined",
                     chunk_tokens=64, act_chunks=1)
    spec = PRESETS["opt-6.7b"]
    fast = plan_text(spec, hw("h200-pcie5", gpu_mem_gb=20.0), kw)
    assert "host issues it in" in fast and "bound by the host" not in fast
    slow = plan_text(spec, hw("h200-pcie5", gpu_mem_gb=20.0, host_op_us=2000.0), kw)
    assert "bound by the host" in slow

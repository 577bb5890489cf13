"""Issue 7's bad-input audit, through the `kvc` command: one line, a non-zero exit, and a
traceback only with --debug. Cases already tested elsewhere are not repeated:

- model.yaml missing, YAML syntax error, unknown key: test_cli.py (test_missing_file,
  test_yaml_syntax_error, test_unknown_key); wrong type: test_config.py
  (test_bad_values_are_one_line_errors).
- missing / mismatched / unexpected checkpoint tensor, pickle via pickle.dump, unknown
  model_type through the API: test_models_parity.py.
- negative or zero bandwidth: test_cli.py (test_bad_override), test_config.py.
- prompt + generation over max positions in model.yaml: test_config.py.
- truncated / edited / other-version artifact through the API, Ctrl-C inside
  write_artifact through the API: test_artifact.py.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kvc
import kvc.artifact
from kvc.cli import main
from kvc.models import preset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = {"model": {"preset": "tiny-opt", "dtype": "float32"}, "hardware": "cpu",
        "workload": {"batch_size": 2, "prompt_len": 8, "gen_len": 8}}
OPT_CONFIG = {"model_type": "opt", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "max_position_embeddings": 128, "ffn_dim": 128}


def _one_line(rc, err, needle):
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("kvc: error:") and needle in lines[0], err


def cli_error(capsys, argv, needle):
    """In-process `kvc ARGV`: exit 2 and one line naming `needle`; --debug raises instead."""
    capsys.readouterr()  # what earlier set-up printed is not this command's
    rc = main(list(map(str, argv)))
    _one_line(rc, capsys.readouterr().err, needle)
    with pytest.raises(kvc.KvcError):
        main(["--debug", *map(str, argv)])


def _yaml(tmp_path, data) -> Path:
    import yaml

    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return kvc.compile(TINY, ["schedule.recompute_fraction=0.5"],
                       output=tmp_path_factory.mktemp("a") / "t.kvc")


def _copy(artifact, tmp_path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / "copy.kvc"))


# --------------------------------------------------------------------------- model.yaml


def test_unreadable_model_yaml(tmp_path, capsys):
    p = tmp_path / "m.yaml"
    p.write_bytes(b"model: \xff\xfe\n")
    _one_line(main(["compile", str(p)]), capsys.readouterr().err, "not UTF-8 text")


# --------------------------------------------------------------------------- models, checkpoints


def test_unknown_preset(tmp_path, capsys):
    cfg = _yaml(tmp_path, {**TINY, "model": {"preset": "gpt-5"}})
    cli_error(capsys, ["compile", cfg], "unknown model preset 'gpt-5'")


def test_unknown_family(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({**OPT_CONFIG, "model_type": "gpt2"}))
    cfg = _yaml(tmp_path, {**TINY, "model": {"checkpoint": str(ckpt)}})
    cli_error(capsys, ["plan", cfg], "unsupported model_type 'gpt2'")


class Payload:
    """Stands for code hidden in a pickle: unpickling it would import and build this class."""


def test_bin_checkpoint_with_pickled_code(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(OPT_CONFIG))
    torch.save({"model.decoder.embed_tokens.weight": torch.zeros(512, 64), "x": Payload()},
               ckpt / "pytorch_model.bin")
    cfg = _yaml(tmp_path, {**TINY, "model": {"checkpoint": str(ckpt), "dtype": "float32"}})
    out = tmp_path / "c.kvc"
    assert main(["compile", str(cfg), "-o", str(out), "schedule.recompute_fraction=0.5"]) == 0
    capsys.readouterr()
    rc = main(["run", str(out), "--max-new-tokens", "2"])
    captured = capsys.readouterr()
    _one_line(rc, captured.err, "refused by torch.load(weights_only=True)")
    assert "Payload" in captured.err  # the line names what it refused


def test_checkpoint_without_tokenizer_and_a_text_prompt(tmp_path, capsys):
    pytest.importorskip("transformers")
    from hf_fixtures import hf_model, save_checkpoint

    ckpt = save_checkpoint(hf_model("opt-preln"), tmp_path / "ckpt")
    cfg = {"model": {"checkpoint": str(ckpt), "dtype": "float32"}, "hardware": "cpu",
           "workload": {"batch_size": 1, "prompt_len": 4, "gen_len": 4}}
    art = kvc.compile(cfg, ["schedule.recompute_fraction=0.5"], output=tmp_path / "c.kvc")
    cli_error(capsys, ["run", art, "--prompt", "hello"], "has no tokenizer")


# --------------------------------------------------------------------------- values


def test_prompt_longer_than_max_positions(artifact, capsys):
    n = preset("tiny-opt").max_positions + 1
    cli_error(capsys, ["run", artifact, "--prompt-ids", ",".join(["1"] * n)],
              f"{n} tokens; this artifact serves at most {n - 1} tokens per row")


def test_prompt_beyond_the_plans_max_context(tmp_path, capsys):
    """A solved plan serves every prompt up to workload.max_context (here 16), shorter than
    the compiled workload's included; a longer one is refused in one line."""
    art = kvc.compile(TINY, ["workload.max_context=16"], output=tmp_path / "solved.kvc")
    assert main(["run", str(art), "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]) == 0
    cli_error(capsys, ["run", art, "--prompt-ids", ",".join(["1"] * 17)],
              "recompile with a larger workload.max_context")


def test_infeasible_memory_budget(capsys):
    # 10 GB now streams some layers' weights from CPU (issue 6); 1 GB cannot hold even the
    # embeddings, two weight slots and the margin
    cli_error(capsys, ["compile", EXAMPLES / "opt-6.7b-h100.yaml", "hardware.gpu_mem_gb=1"],
              "short of streaming even one layer")


@pytest.mark.parametrize("override, needle", [
    ("hardware.attn_gbps=0", "hardware.attn_gbps = 0"),
    ("hardware.mem_gbps=-1", "hardware.mem_gbps = -1"),
])
def test_impossible_hardware_rate(capsys, override, needle):
    cli_error(capsys, ["plan", EXAMPLES / "tiny-opt.yaml", override], needle)


@pytest.mark.parametrize("args, needle", [
    (["--prompt", "a", "--prompt-ids", "1"], "not both"),
    (["--prompts-file", "/nonexistent/p.txt"], "cannot read it"),
    (["--prompt-ids", "1,x"], "expected comma-separated integers"),
    (["--prompt-ids", "9999"], "outside the vocabulary"),
    (["--max-new-tokens", "0"], "expected >= 1"),
])
def test_bad_run_arguments(artifact, capsys, args, needle):
    cli_error(capsys, ["run", artifact, *args], needle)


def test_trace_dir_is_a_file(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("")
    cli_error(capsys, ["bench", EXAMPLES / "tiny-opt.yaml", "--trace", f], "is not a folder")


# --------------------------------------------------------------------------- artifacts


def test_truncated_artifact(artifact, tmp_path, capsys):
    a = _copy(artifact, tmp_path)
    text = (a / "manifest.json").read_text()
    (a / "manifest.json").write_text(text[: len(text) // 3])
    cli_error(capsys, ["run", a], "damaged manifest")
    cli_error(capsys, ["inspect", a], "damaged manifest")


def test_edited_artifact(artifact, tmp_path, capsys):
    a = _copy(artifact, tmp_path)
    (a / "graph.py").write_text((a / "graph.py").read_text().replace("def ", "def  ", 1))
    cli_error(capsys, ["run", a], "missing or edited")


def test_other_format_version(artifact, tmp_path, capsys):
    a = _copy(artifact, tmp_path)
    m = json.loads((a / "manifest.json").read_text())
    m["format_version"] = 0
    (a / "manifest.json").write_text(json.dumps(m))
    cli_error(capsys, ["run", a], "format version 0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU-only fallback")
def test_cuda_artifact_on_a_cpu_machine(tmp_path, capsys):
    """Documented fallback (README "Python"): a CUDA-compiled artifact runs on the CPU with
    streams and events as no-ops; asking for CUDA explicitly is a one-line error."""
    art = kvc.compile(TINY, ["hardware=h100-pcie5", "schedule.recompute_fraction=0.5"],
                      output=tmp_path / "gpu.kvc")
    assert json.loads((art / "manifest.json").read_text())["hardware"]["device"] == "cuda"
    assert main(["run", str(art), "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert "compiled for CUDA (h100-pcie5); running the same schedule on the CPU" in err
    assert [len(r.split()) for r in out.strip().splitlines()] == [3, 3]
    cli_error(capsys, ["run", art, "--device", "cuda"], "no CUDA device")


# SIGINT from inside write_artifact's file writes: the temporary folder exists by then
INTERRUPT_WHILE_WRITING = textwrap.dedent("""
    import os, signal, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's, if inherited ignored
    import kvc.artifact.write as _art
    _real = _art._write_file
    def _interrupted(path, data):
        assert ".kvc-tmp." in path.parent.name
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.3)  # the signal may land on one of torch's threads: let it arrive
        return _real(path, data)
    _art._write_file = _interrupted
""")


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "replacing"])
def test_ctrl_c_during_compile_via_cli(tmp_path, existing):
    """SIGINT while the artifact is written: exit 130, one line, no temporary left behind, and
    an artifact that was there before is still there, whole."""
    out = tmp_path / "y.kvc"
    if existing:
        kvc.compile(EXAMPLES / "tiny-opt.yaml", output=out)
        before = (out / "manifest.json").read_bytes()
    script = INTERRUPT_WHILE_WRITING + textwrap.dedent(f"""
        import sys
        from kvc.cli import main
        sys.exit(main(["compile", {str(EXAMPLES / 'tiny-opt.yaml')!r}, "-o", {str(out)!r}]))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip().splitlines() == ["kvc: interrupted"]
    assert [p.name for p in tmp_path.iterdir()] == (["y.kvc"] if existing else [])
    if existing:
        assert (out / "manifest.json").read_bytes() == before
        kvc.artifact.read_manifest(out)


def test_compile_onto_a_folder_that_is_not_an_artifact(tmp_path, capsys):
    """Issue 16's data loss: a folder with a manifest.json of its own is left alone."""
    ext = tmp_path / "myext"
    (ext / "src").mkdir(parents=True)
    (ext / "manifest.json").write_text("{}")
    (ext / "src" / "bg.js").write_text("x")
    cli_error(capsys, ["compile", EXAMPLES / "tiny-opt.yaml", "-o", ext], "is not a kvc artifact")
    assert (ext / "src" / "bg.js").read_text() == "x" and (ext / "manifest.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["myext"]


@pytest.mark.parametrize("where", [".", ".."])
def test_compile_onto_the_current_folder(tmp_path, capsys, monkeypatch, where):
    (tmp_path / "d").mkdir()
    monkeypatch.chdir(tmp_path / "d")
    cli_error(capsys, ["compile", EXAMPLES / "tiny-opt.yaml", "-o", where], "the current folder")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["d"]


@pytest.mark.parametrize("err", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_compile_onto_an_unwritable_filesystem(tmp_path, capsys, monkeypatch, err):
    import kvc.artifact.write as art

    def fail(path, data):
        raise OSError(err, os.strerror(err), str(path))

    monkeypatch.setattr(art, "_write_file", fail)
    out = tmp_path / "x.kvc"
    cli_error(capsys, ["compile", EXAMPLES / "tiny-opt.yaml", "-o", out], os.strerror(err))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- issue 16: one line, exit 2


@pytest.mark.parametrize("device", ["foo", "", "meta", "mps", "cpu:1", "cuda:x", "cuda:9999"])
def test_bad_device(artifact, capsys, device, monkeypatch):
    needle = "no CUDA device" if device == "cuda:9999" and not torch.cuda.is_available() else \
        ("CUDA device(s)" if device == "cuda:9999" else "kvc runs on cpu or cuda")

    def loads(*a, **k):  # the device is refused before anything is read or built
        raise AssertionError("kvc run loaded the artifact before checking --device")

    with monkeypatch.context() as m:
        m.setattr(kvc, "load", loads)
        m.setattr("kvc.api.load_artifact", loads)
        cli_error(capsys, ["run", artifact, "--device", device], needle)
    cli_error(capsys, ["bench", EXAMPLES / "tiny-opt.yaml", "--device", device], needle)


@pytest.mark.parametrize("device", ["foo", "meta"])
def test_bad_device_through_the_api(artifact, device):
    with pytest.raises(kvc.KvcError):
        kvc.load(artifact, device=device)


@pytest.mark.parametrize("override, needle", [
    ("hardware.gpu_mem_gb=inf", "hardware.gpu_mem_gb = inf"),
    ("schedule.solver_time_limit_s=nan", "schedule.solver_time_limit_s = nan"),
    ("schedule.solver_time_limit_s=-1", "schedule.solver_time_limit_s = -1.0"),
])
def test_non_finite_numbers(capsys, override, needle):
    cli_error(capsys, ["compile", EXAMPLES / "tiny-opt.yaml", override], needle)


def test_inf_in_model_yaml(tmp_path, capsys):
    p = tmp_path / "m.yaml"
    p.write_text((EXAMPLES / "tiny-opt.yaml").read_text().replace("hardware: cpu",
                                                                   "hardware: {preset: cpu, gpu_mem_gb: .inf}"))
    cli_error(capsys, ["plan", p], "hardware.gpu_mem_gb = inf")


def test_billion_laughs_model_yaml(tmp_path, capsys):
    lines = ["model: {preset: tiny-opt}", "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    p = tmp_path / "m.yaml"
    p.write_text("\n".join(lines) + "\n")
    from test_config import time_limit

    with time_limit(10):  # expanding it would take minutes and gigabytes
        cli_error(capsys, ["compile", p], "YAML aliases")


def test_search_is_bounded(capsys):
    cli_error(capsys, ["plan", EXAMPLES / "tiny-opt.yaml", "--search", "1000000000000"],
              "--search 1000000000000: expected the largest batch to try, 1..65536")


@pytest.mark.parametrize("name, config", [
    ("list", [OPT_CONFIG]),
    ("null", {**OPT_CONFIG, "vocab_size": None}),
])
def test_config_json_of_the_wrong_shape(tmp_path, capsys, name, config):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(config))
    cfg = _yaml(tmp_path, {**TINY, "model": {"checkpoint": str(ckpt)}})
    cli_error(capsys, ["plan", cfg], "config.json")


@pytest.mark.parametrize("key, value", [("num_hidden_layers", -2), ("vocab_size", 10 ** 30),
                                        ("hidden_size", 64.5), ("num_hidden_layers", "2")])
def test_config_json_with_a_wrong_value(tmp_path, capsys, key, value):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({**OPT_CONFIG, key: value}))
    cfg = _yaml(tmp_path, {**TINY, "model": {"checkpoint": str(ckpt)}})
    cli_error(capsys, ["plan", cfg], "config.json")


def test_trace_onto_an_unwritable_place(tmp_path, capsys, monkeypatch):
    f = tmp_path / "f"
    f.write_text("")
    cli_error(capsys, ["bench", EXAMPLES / "tiny-opt.yaml", "--trace", f / "sub"], "cannot make the folder")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only filesystem
    cli_error(capsys, ["bench", EXAMPLES / "tiny-opt.yaml", "--trace", tmp_path / "t"], "cannot write into it")


def test_trace_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A full disk while a trace is written: one line, the previous file as it was, no
    truncated file or temporary."""
    from kvc.reports import timeline

    d = tmp_path / "t"
    d.mkdir()
    (d / "predicted.json").write_text("old")

    def half(tmp):
        tmp.write_text('{"traceEvents": [')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(kvc.KvcError, match="No space left on device"):
        timeline.write_atomically(d / "predicted.json", half)
    assert [p.name for p in d.iterdir()] == ["predicted.json"]
    assert (d / "predicted.json").read_text() == "old"
    real = timeline.Path.write_text

    def full_disk(self, text):
        real(self, text[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(timeline.Path, "write_text", full_disk)
    with pytest.raises(kvc.KvcError, match="No space left on device"):
        timeline.write_chrome_trace([], d / "predicted.json")
    assert [p.name for p in d.iterdir()] == ["predicted.json"]
    assert (d / "predicted.json").read_text() == "old"


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "PYTHONUNBUFFERED"])
def test_inspect_into_a_closed_pipe(artifact, buffered):
    """`kvc inspect X | head -1`: the reader goes away; kvc exits quietly (no traceback, no
    'Exception ignored' at exit), as a command killed by SIGPIPE would. Buffered (a pipe's
    default), the write fails only when stdout is flushed; unbuffered, at the print."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    p = subprocess.Popen([sys.executable, "-m", "kvc.cli", "inspect", str(artifact)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # nobody reads: the first write fails with EPIPE
    err = p.stderr.read().decode()
    assert p.wait() == 141 and err == "", err


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.update(weights={"kind": "checkpoint", "sha256": {}}), "weights.path"),
    (lambda m: m.update(code_hash=5), "code_hash is not a hex digest"),
    (lambda m: m["plan"].update(resident="yes"), "plan.resident"),
])
def test_manifest_field_of_the_wrong_type(artifact, tmp_path, capsys, edit, needle):
    a = _copy(artifact, tmp_path)
    m = json.loads((a / "manifest.json").read_text())
    edit(m)
    (a / "manifest.json").write_text(json.dumps(m))
    cli_error(capsys, ["run", a], needle)
    cli_error(capsys, ["inspect", a], needle)


def test_profile_output_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    """`kvc profile -o DIR` is one line and leaves no DIR.tmp; a write that fails leaves no
    temporary and the previous profile as it was."""
    from kvc.hardware import HardwareConfig
    from kvc.profiler import measure, resolve

    monkeypatch.setattr(measure, "profile", lambda device, progress=True: HardwareConfig())
    d = tmp_path / "dir"
    d.mkdir()
    cli_error(capsys, ["profile", "--device", "cpu", "-o", d], "is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"] and list(d.iterdir()) == []
    out = d / "m.yaml"
    resolve.write_profile_yaml(HardwareConfig(name="first"), out)
    monkeypatch.setattr(resolve.yaml, "safe_dump", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(kvc.KvcError, match="No space left on device"):
        resolve.write_profile_yaml(HardwareConfig(name="second"), out)
    assert [p.name for p in d.iterdir()] == ["m.yaml"]
    assert resolve.read_profile_yaml(out).name == "first"


def test_profile_honours_no_progress(tmp_path, monkeypatch):
    from kvc.hardware import HardwareConfig
    from kvc.profiler import measure

    seen = []
    monkeypatch.setattr(measure, "profile", lambda device, progress=True: (seen.append(progress),
                                                                           HardwareConfig())[1])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["--no-progress", "profile", "--device", "cpu", "-o", str(tmp_path / "p.yaml")]) == 0
    assert main(["profile", "--device", "cpu", "-o", str(tmp_path / "p.yaml")]) == 0
    assert seen == [False, True]


def test_profile_yaml_with_aliases_or_bad_values_is_refused(tmp_path):
    from kvc.profiler import resolve

    p = tmp_path / "p.yaml"
    p.write_text("a: &a 1\nh2d_gbps: *a\n")
    with pytest.raises(kvc.KvcError, match="YAML aliases"):
        resolve.read_profile_yaml(p)
    p.write_text("h2d_gbps: .nan\n")
    with pytest.raises(kvc.KvcError, match="h2d_gbps = nan"):
        resolve.read_profile_yaml(p)
    p.write_text("h2d_gbps: fast\n")
    with pytest.raises(kvc.KvcError, match="wrong type"):
        resolve.read_profile_yaml(p)


def test_model_larger_than_host_memory_is_refused():
    """llama-2-70b's 138 GB of weights on a CPU: one KvcError before any allocation, not the
    OS's OOM killer. (The subprocess runs under a 4 GB address-space limit, so today's
    allocation fails at once instead of swapping the machine to death.)"""
    script = textwrap.dedent("""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
        import kvc
        from kvc.models import build_model, preset
        try:
            build_model(preset("llama-2-70b"), "cpu", "float16")
        except kvc.KvcError as e:
            print("KvcError", e)
        except BaseException as e:
            print("other", type(e).__name__)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False,
                       timeout=300)
    assert r.stdout.startswith("KvcError"), (r.stdout, r.stderr[-500:])


def test_ctrl_c_while_solving_leaves_no_solver_files(tmp_path, monkeypatch):
    """Ctrl-C while CBC runs (`kvc plan --search` pressed away): pulp's .mps/.sol files go."""
    import tempfile

    import pulp.apis.coin_api as coin

    from kvc.api import make_plan, resolve

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(coin.subprocess, "Popen", ctrl_c)
    r = resolve(TINY, [])
    with pytest.raises(KeyboardInterrupt):
        make_plan(r)
    left = [p.name for p in tmp_path.rglob("*") if p.suffix in (".mps", ".lp", ".sol", ".mst")
            or p.name.startswith("kvc-lp-")]
    assert left == []

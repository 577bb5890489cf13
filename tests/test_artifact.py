"""Compile -> artifact folder -> load: same tokens as the reference; damaged artifacts refused;
replacing an artifact is one step, refuses anything that is not one, and an interruption at
any stage of the write leaves the old or the new artifact whole and no temporary folder."""
import errno
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import kvc
import kvc.artifact as art
from kvc.artifact import replace as art_replace
from kvc.artifact import write as art_write
from kvc.errors import KvcError
from kvc.models import build_model, preset
from kvc.runtime.reference import ReferenceDecoder

TINY = {"model": {"preset": "tiny-llama", "dtype": "float32"}, "hardware": "cpu",
        "workload": {"batch_size": 2, "prompt_len": 8, "gen_len": 8}}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("a") / "tiny.kvc"
    return kvc.compile(TINY, overrides=["schedule.recompute_fraction=0.5"], output=out)


def test_folder_contents(artifact):
    assert sorted(p.name for p in artifact.iterdir()) == ["graph.py", "manifest.json"]
    m = json.loads((artifact / "manifest.json").read_text())
    for key in ("format", "format_version", "kvc_version", "torch_version", "config", "hardware",
                "plan", "code_hash", "weights", "model_spec"):
        assert key in m
    assert m["format"] == "kvc-artifact"
    assert m["weights"] == {"kind": "dummy", "preset": "tiny-llama", "seed": 0}
    graph = (artifact / "graph.py").read_text()
    assert "offload_kv_1" in graph and "prefetch_kv_1" in graph and "staged_act_1_0" in graph
    umask = os.umask(0)
    os.umask(umask)
    assert artifact.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


def test_load_generates_like_reference(artifact):
    model = kvc.load(artifact, device="cpu")
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(1))
    tokens, logits = model.generate(ids, 8, return_logits=True)
    ref = build_model(preset("tiny-llama"), "cpu", torch.float32, seed=0)
    ref_tokens, ref_logits = ReferenceDecoder(ref, preset("tiny-llama")).generate(ids, 8, return_logits=True)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits.float(), atol=1e-5, rtol=0)
    assert tokens.shape == (2, 16) and logits.shape == (2, 8, 512)


def _copy(artifact, tmp_path):
    dst = tmp_path / "copy.kvc"
    shutil.copytree(artifact, dst)
    return dst


def _edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_wrong_format_version(artifact, tmp_path):
    a = _copy(artifact, tmp_path)
    _edit_manifest(a, lambda m: m.update(format_version=99))
    with pytest.raises(KvcError, match="format version 99"):
        kvc.load(a)


def test_edited_graph(artifact, tmp_path):
    a = _copy(artifact, tmp_path)
    (a / "graph.py").write_text((a / "graph.py").read_text() + "\n# edited\n")
    with pytest.raises(KvcError, match="graph.py: missing or edited"):
        kvc.load(a)


def test_truncated_manifest(artifact, tmp_path):
    a = _copy(artifact, tmp_path)
    text = (a / "manifest.json").read_text()
    (a / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(KvcError, match="damaged manifest"):
        kvc.load(a)


def test_regenerated_code_hash_differs(artifact, tmp_path):
    a = _copy(artifact, tmp_path)
    _edit_manifest(a, lambda m: m.update(code_hash="0" * 64))
    with pytest.raises(KvcError, match="regenerated code differs"):
        kvc.load(a)


def test_not_an_artifact(tmp_path):
    with pytest.raises(KvcError, match="not a kvc artifact"):
        kvc.load(tmp_path)


def test_changed_checkpoint_file(tmp_path):
    from hf_fixtures import hf_model, save_checkpoint

    ckpt = save_checkpoint(hf_model("llama2-mha"), tmp_path / "ckpt")
    cfg = {"model": {"checkpoint": str(ckpt), "dtype": "float32"}, "hardware": "cpu",
           "workload": {"batch_size": 1, "prompt_len": 4, "gen_len": 4}}
    a = kvc.compile(cfg, overrides=["schedule.recompute_fraction=0.25"], output=tmp_path / "c.kvc")
    assert kvc.load(a, device="cpu").generate(torch.tensor([[1, 2, 3, 4]]), 4).shape == (1, 8)
    weights = next(ckpt.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(KvcError, match="checkpoint file changed since compile"):
        kvc.load(a)


# --------------------------------------------------------------------------- replacing


@pytest.fixture(scope="module")
def parts():
    """write_artifact's inputs for two plans (recompute fraction 0 and 1), made once."""
    from kvc.api import make_plan, resolve
    from kvc.compiler.lowering import lower

    out = {}
    for f in (0, 1):
        r = resolve(TINY, [f"schedule.recompute_fraction={f}"])
        plan = make_plan(r)
        out[f] = (r, plan, lower(build_model(r.spec, "meta", r.config.model.dtype), plan))
    return out


def fraction(path: Path):
    """Which of the two plans the whole artifact at `path` holds (read_manifest checks it)."""
    return art.read_manifest(path)["config"]["schedule"]["recompute_fraction"]


def names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_compile_replaces_atomically_and_leaves_no_temp(tmp_path):
    out = tmp_path / "x.kvc"
    kvc.compile(TINY, overrides=["schedule.recompute_fraction=0"], output=out)
    assert fraction(out) == 0
    kvc.compile(TINY, overrides=["schedule.recompute_fraction=1"], output=out)
    assert fraction(out) == 1  # replaced, not kept
    assert names(tmp_path) == ["x.kvc"]
    (tmp_path / "plain").mkdir()
    with pytest.raises(KvcError, match="not a kvc artifact"):
        kvc.compile(TINY, output=tmp_path / "plain")


def test_replacing_swaps_in_one_step(parts, tmp_path, monkeypatch):
    """Where the OS can exchange two names, the old artifact is never moved aside: a plain
    rename of the name away is never made, so no moment leaves the name empty."""
    out = tmp_path / "x.kvc"
    art.write_artifact(out, *parts[0])
    renames = []
    real = os.rename
    monkeypatch.setattr(art_replace.os, "rename", lambda a, b: (renames.append((a, b)), real(a, b)))
    seen = []
    real_exchange = art_replace._exchange

    def exchange(tmp, o):
        seen.append(fraction(o))  # the name holds the old artifact up to the exchange...
        done = real_exchange(tmp, o)
        seen.append(fraction(o))  # ...and the new one right after
        return done

    monkeypatch.setattr(art_replace, "_exchange", exchange)
    art.write_artifact(out, *parts[1])
    assert seen == [0, 1] and renames == [] and fraction(out) == 1
    assert names(tmp_path) == ["x.kvc"]


def _home(name: str):
    """The kvc.artifact module whose function `name` is: every caller looks it up there."""
    return art_write if hasattr(art_write, name) else art_replace


class Interrupt:
    """Patch `name` in the kvc.artifact module that defines it (write or replace) so that its
    `call`-th call raises KeyboardInterrupt, before doing its work (`after=False`) or after it."""

    def __init__(self, monkeypatch, name, call=1, after=False, target=None):
        target = target or _home(name)
        self.real, self.n = getattr(target, name), 0

        def fn(*a, **k):
            self.n += 1
            if self.n == call and not after:
                raise KeyboardInterrupt
            result = self.real(*a, **k)
            if self.n == call:
                raise KeyboardInterrupt
            return result

        monkeypatch.setattr(target, name, fn)


NO_EXCHANGE = "no exchange"  # the OS or filesystem cannot exchange: two renames
# (stage, function interrupted, its call, after its work?, which artifact the name holds)
STAGES = [
    ("before the temporary folder", "_make_temp", 1, False, 0),
    ("while writing graph.py", "_write_file", 1, False, 0),
    ("after writing the manifest", "_write_file", 2, True, 0),
    ("before placing", "_fsync", 1, True, 0),
    ("before the exchange", "_exchange", 1, False, 0),
    ("right after the exchange", "_exchange", 1, True, 1),
    ("removing the replaced artifact", "_remove_tree", 1, False, 1),
    ("syncing the parent folder", "_fsync", 2, False, 1),
    (NO_EXCHANGE + ", before moving the old one aside", "rename", 1, False, 0),
    (NO_EXCHANGE + ", between the two renames", "rename", 1, True, 0),
    (NO_EXCHANGE + ", before the second rename", "rename", 2, False, 0),
    (NO_EXCHANGE + ", after the second rename", "rename", 2, True, 1),
]


@pytest.mark.parametrize("stage, name, call, after, holds", STAGES, ids=[s[0] for s in STAGES])
def test_interrupted_replace_keeps_one_whole_artifact(parts, tmp_path, monkeypatch, stage, name,
                                                      call, after, holds):
    out = tmp_path / "x.kvc"
    art.write_artifact(out, *parts[0])
    if stage.startswith(NO_EXCHANGE):
        monkeypatch.setattr(art_replace, "_exchange", lambda tmp, o: False)
    Interrupt(monkeypatch, name, call, after, target=art_replace.os if name == "rename" else None)
    with pytest.raises(KeyboardInterrupt):
        art.write_artifact(out, *parts[1])
    monkeypatch.undo()
    assert names(tmp_path) == ["x.kvc"]
    assert fraction(out) == holds


@pytest.mark.parametrize("after", [False, True])
def test_interrupted_first_compile_leaves_nothing_or_the_artifact(parts, tmp_path, monkeypatch, after):
    out = tmp_path / "sub" / "y.kvc"
    Interrupt(monkeypatch, "_rename_new", 1, after)
    with pytest.raises(KeyboardInterrupt):
        art.write_artifact(out, *parts[1])
    monkeypatch.undo()
    assert names(out.parent) == (["y.kvc"] if after else [])
    if after:
        assert fraction(out) == 1


# real signals, in a subprocess: each scenario patches one stage to send SIGINT to itself
SIGNAL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, time
    # a process started in the background inherits SIGINT ignored: Ctrl-C as a terminal's
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import kvc.artifact as art
    from kvc.artifact import replace as art_replace, write as art_write
    from kvc.api import make_plan, resolve
    from kvc.compiler.lowering import lower
    from kvc.models import build_model

    TINY = {tiny!r}
    parts = {{}}
    for f in (0, 1):
        r = resolve(TINY, [f"schedule.recompute_fraction={{f}}"])
        plan = make_plan(r)
        parts[f] = (r, plan, lower(build_model(r.spec, "meta", "float32"), plan))

    def ctrl_c(name, every=False, target=None, before=None):
        target = target or (art_write if hasattr(art_write, name) else art_replace)
        real, n = getattr(target, name), [0]
        def fn(*a, **k):
            n[0] += 1
            if (every or n[0] == 1) and (before is None or before(*a)):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.3)  # the signal may land on one of torch's threads: let it arrive
            return real(*a, **k)
        setattr(target, name, fn)
        return lambda: setattr(target, name, real)

    results = {{}}
    root = sys.argv[1]
    scenarios = [
        ("while writing", lambda: ctrl_c("_write_file")),
        ("during the exchange", lambda: ctrl_c("_exchange")),
        ("twice while cleaning up", lambda: ctrl_c("_remove_tree", every=True)),
        ("between two renames", lambda: (setattr(art_replace, "_exchange", lambda t, o: False),
                                         ctrl_c("rename", target=art_replace.os))[1]),
    ]
    real_exchange = art_replace._exchange
    for k, (name, patch) in enumerate(scenarios):
        parent = os.path.join(root, str(k))
        os.makedirs(parent)
        out = os.path.join(parent, "x.kvc")
        art.write_artifact(out, *parts[0])
        undo = patch()
        try:
            art.write_artifact(out, *parts[1])
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
        undo()
        art_replace._exchange = real_exchange
        m = art.read_manifest(out)
        results[name] = {{"interrupted": interrupted, "left": sorted(os.listdir(parent)),
                         "fraction": m["config"]["schedule"]["recompute_fraction"]}}
    print(json.dumps(results))
""")


def test_ctrl_c_at_every_stage_with_real_signals(tmp_path):
    """SIGINT as a user's Ctrl-C sends it: while writing (the old artifact stays), during the
    exchange and during the clean-up (held back until the new artifact is in place and every
    temporary is gone; a second Ctrl-C while cleaning up leaves nothing either)."""
    r = subprocess.run([sys.executable, "-c", SIGNAL_SCRIPT.format(tiny=TINY), str(tmp_path)], check=False,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for name, v in res.items():
        assert v["interrupted"], name  # the Ctrl-C is never swallowed
        assert v["left"] == ["x.kvc"], (name, v)
    assert res["while writing"]["fraction"] == 0
    assert res["during the exchange"]["fraction"] == 1
    assert res["twice while cleaning up"]["fraction"] == 1
    assert res["between two renames"]["fraction"] in (0, 1)


def _write_many(out, parts_list, n, no_exchange, barrier=None):
    if no_exchange:
        art_replace._exchange = lambda tmp, o: False
    for k in range(n):
        art.write_artifact(out, *parts_list[k % 2])


@pytest.mark.parametrize("no_exchange", [False, True], ids=["exchange", "two renames"])
@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "replace"])
def test_two_compiles_at_once_end_with_one_whole_artifact(parts, tmp_path, monkeypatch, existing,
                                                          no_exchange):
    """Both temporaries are finished before either is placed (a barrier in the last step
    before placing): whichever wins, the name holds one whole artifact and nothing else."""
    out = tmp_path / "x.kvc"
    if existing:
        art.write_artifact(out, *parts[0])
    if no_exchange:
        monkeypatch.setattr(art_replace, "_exchange", lambda tmp, o: False)
    barrier = threading.Barrier(2, timeout=60)
    real_fsync = art_write._fsync

    def fsync(folder):
        real_fsync(folder)
        if ".kvc-tmp." in folder.name:
            barrier.wait()

    monkeypatch.setattr(art_write, "_fsync", fsync)
    with ThreadPoolExecutor(2) as pool:  # .result() raises here what a compile raised there
        for done in [pool.submit(art.write_artifact, out, *parts[f]) for f in (0, 1)]:
            done.result(timeout=120)
    assert names(tmp_path) == ["x.kvc"]
    assert fraction(out) in (0, 1)


@pytest.mark.parametrize("no_exchange", [False, True], ids=["exchange", "two renames"])
def test_the_name_moved_away_while_placing(parts, tmp_path, monkeypatch, no_exchange):
    """Between seeing the old artifact and replacing it, another compile moved it aside (the
    first of its two renames): this compile tries again and places its own."""
    out = tmp_path / "x.kvc"
    art.write_artifact(out, *parts[0])
    if no_exchange:
        monkeypatch.setattr(art_replace, "_exchange", lambda tmp, o: False)
    real, calls = art_replace._check_replaceable, []

    def moved_first(o, missing_ok=False):
        calls.append(missing_ok)
        if not missing_ok and len(calls) == 2:  # the check in _place, the first time
            os.rename(o, tmp_path / "aside")
            shutil.rmtree(tmp_path / "aside")
        return real(o, missing_ok)

    monkeypatch.setattr(art_replace, "_check_replaceable", moved_first)
    art.write_artifact(out, *parts[1])
    assert names(tmp_path) == ["x.kvc"] and fraction(out) == 1


@pytest.mark.parametrize("no_exchange", [False, True], ids=["exchange", "two renames"])
def test_concurrent_processes_end_with_one_whole_artifact(parts, tmp_path, no_exchange):
    out = tmp_path / "x.kvc"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(out, [parts[0], parts[1]], 12, no_exchange))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert names(tmp_path) == ["x.kvc"]
    assert fraction(out) in (0, 1)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_a_killed_compile_are_recovered(parts, tmp_path):
    """A compile killed outright (SIGKILL) between two renames left the old artifact aside and
    its temporary: the next compile puts the old one back, removes the temporary, then
    replaces it; a live compile's temporary is never touched."""
    out = tmp_path / "x.kvc"
    art.write_artifact(out, *parts[0])
    host, dead = art_replace._tag().split(".")[0], _dead_pid()
    old = tmp_path / f".x.kvc.kvc-old.{host}.{dead}.abc_1"
    os.rename(out, old)
    tmp = tmp_path / f".x.kvc.kvc-tmp.{host}.{dead}.abc_1"
    tmp.mkdir()
    (tmp / "graph.py").write_text("half")
    live = tmp_path / f".x.kvc.kvc-tmp.{host}.{os.getppid()}.xyz"
    live.mkdir()
    art_replace._recover_leftovers(out)
    assert names(tmp_path) == sorted([live.name, "x.kvc"]) and fraction(out) == 0
    (tmp_path / f".x.kvc.kvc-tmp.{host}.{dead}.def_2").mkdir()  # killed again
    art.write_artifact(out, *parts[1])  # a compile recovers on its own
    assert names(tmp_path) == sorted([live.name, "x.kvc"]) and fraction(out) == 1


def test_interrupted_compile_leaves_nothing(tmp_path):
    """Ctrl-C while the artifact's files are written (the temporary folder exists): no
    folder, no temporary left behind."""
    script = textwrap.dedent(f"""
        import os, signal, time
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's, if inherited ignored
        import kvc, kvc.artifact.write as art_write
        real = art_write._write_file
        def interrupted(path, data):
            assert ".kvc-tmp." in path.parent.name  # the temporary folder exists
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)  # the signal may land on one of torch's threads: let it arrive
            return real(path, data)
        art_write._write_file = interrupted
        kvc.compile({TINY!r}, overrides=["schedule.recompute_fraction=0.5"], output={str(tmp_path / 'y.kvc')!r})
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert r.returncode != 0 and "KeyboardInterrupt" in r.stderr
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- what is replaced


def _kvc_manifest_only(folder: Path, **fields):
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format_version": 1, "kvc_version": "0.1.0", **fields}))


@pytest.mark.parametrize("make, why", [
    (lambda p: (p.mkdir(), (p / "manifest.json").write_text("{}"), (p / "src").mkdir(),
                (p / "src" / "bg.js").write_text("x")), "it holds src"),
    (lambda p: (p.mkdir(), (p / "manifest.json").write_text("{}")), "does not name kvc's format"),
    (lambda p: (p.mkdir(), (p / "manifest.json").write_text("not json")), "not JSON"),
    (lambda p: _kvc_manifest_only(p, format="other-tool"), "does not name kvc's format"),
    (lambda p: (_kvc_manifest_only(p, format="kvc-artifact"), (p / "notes.txt").write_text("mine")),
     "it holds notes.txt"),
    (lambda p: p.write_text("a file"), "not a folder"),
    (lambda p: (p.mkdir(),), "no manifest.json"),
], ids=["issue-16 myext", "empty manifest", "not json", "other format", "extra file", "a file", "no manifest"])
def test_only_a_kvc_artifact_is_replaced(parts, tmp_path, monkeypatch, make, why):
    out = tmp_path / "x"
    make(out)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))

    def no_temp(o):
        raise AssertionError("refused only after making a temporary folder")

    monkeypatch.setattr(art_write, "_make_temp", no_temp)  # refused before any work
    with pytest.raises(KvcError, match=why) as e:
        art.write_artifact(out, *parts[0])
    assert "\n" not in str(e.value) and "not a kvc artifact" in str(e.value)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("appears", ["a folder of notes", "a file"])
def test_a_folder_that_appears_while_compiling_is_not_replaced(parts, tmp_path, monkeypatch, appears):
    """The name was free when the compile began; what another program puts there before the
    artifact is placed is refused (not renamed over or exchanged away) and left as it is."""
    out = tmp_path / "x.kvc"
    real = art_write._write_file

    def write(path, data):
        if not out.exists():
            if appears == "a file":
                out.write_text("mine")
            else:
                out.mkdir()
                (out / "notes.txt").write_text("mine")
        real(path, data)

    monkeypatch.setattr(art_write, "_write_file", write)
    with pytest.raises(KvcError, match="is not a kvc artifact"):
        art.write_artifact(out, *parts[0])
    assert names(tmp_path) == ["x.kvc"]
    assert (out.read_text() if appears == "a file" else (out / "notes.txt").read_text()) == "mine"


def test_a_symlink_is_not_replaced(parts, tmp_path):
    real = tmp_path / "real.kvc"
    art.write_artifact(real, *parts[0])
    (tmp_path / "link.kvc").symlink_to(real)
    with pytest.raises(KvcError, match="a symbolic link"):
        art.write_artifact(tmp_path / "link.kvc", *parts[1])
    assert fraction(real) == 0 and (tmp_path / "link.kvc").is_symlink()


def test_an_artifact_from_before_the_format_marker_is_replaced(parts, tmp_path):
    out = tmp_path / "x.kvc"
    art.write_artifact(out, *parts[0])
    _edit_manifest(out, lambda m: m.pop("format"))
    art.write_artifact(out, *parts[1])
    assert fraction(out) == 1 and names(tmp_path) == ["x.kvc"]


@pytest.mark.parametrize("where", [".", "..", "sub/.."])
def test_output_is_the_current_folder(parts, tmp_path, monkeypatch, where):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KvcError, match="the current folder or one above it"):
        art.write_artifact(Path(where), *parts[0])
    assert names(tmp_path) == ["sub"]


@pytest.mark.parametrize("fail, needle", [
    ("mkdtemp", "Read-only file system"),
    ("write", "No space left on device"),
    ("parent", "Not a directory"),
])
def test_unwritable_output_is_one_line_and_leaves_the_old(parts, tmp_path, monkeypatch, fail, needle):
    out = tmp_path / "x.kvc"
    art.write_artifact(out, *parts[0])
    if fail == "mkdtemp":
        def mkdtemp(*a, **k):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path))
        monkeypatch.setattr(art_write.tempfile, "mkdtemp", mkdtemp)
    elif fail == "write":
        real = art_write._write_file

        def write(path, data):
            real(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        monkeypatch.setattr(art_write, "_write_file", write)
    else:
        (tmp_path / "f").write_text("")
        out = tmp_path / "f" / "x.kvc"
    with pytest.raises(KvcError, match=needle) as e:
        art.write_artifact(out, *parts[1])
    assert str(e.value).startswith("cannot write the artifact") and "\n" not in str(e.value)
    monkeypatch.undo()
    assert names(tmp_path) == (["f", "x.kvc"] if fail == "parent" else ["x.kvc"])
    assert fraction(tmp_path / "x.kvc") == 0


# --------------------------------------------------------------------------- what is read


def test_manifest_and_graph_must_be_regular_files_inside(artifact, tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(3 << 30)  # sparse: 3 GB that must not be read
    for name in ("graph.py", "manifest.json"):
        a = tmp_path / f"{name}.kvc"
        shutil.copytree(artifact, a)
        (a / name).unlink()
        (a / name).symlink_to(big)
        t0 = time.perf_counter()
        with pytest.raises(KvcError, match="a symbolic link"):
            art.read_manifest(a)
        assert time.perf_counter() - t0 < 1
    a = tmp_path / "huge.kvc"
    shutil.copytree(artifact, a)
    with open(a / "manifest.json", "r+b") as f:
        f.truncate(art.MAX_MANIFEST_BYTES + 1)
    with pytest.raises(KvcError, match="more than an artifact's manifest.json may be"):
        art.read_manifest(a)
    a = tmp_path / "fifo.kvc"
    shutil.copytree(artifact, a)
    (a / "graph.py").unlink()
    os.mkfifo(a / "graph.py")  # opening it for reading would wait for a writer
    with pytest.raises(KvcError, match="not a regular file"):
        art.read_manifest(a)


def _deep(m, keys, value):
    for k in keys[:-1]:
        m = m[k]
    if value is KeyError:
        del m[keys[-1]]
    else:
        m[keys[-1]] = value


@pytest.mark.parametrize("keys, value, needle", [
    (["code_hash"], 5, "code_hash is not a hex digest"),
    (["graph_sha256"], None, "graph_sha256"),
    (["weights"], {"kind": "checkpoint", "sha256": {}}, "weights.path"),
    (["weights"], {"kind": "checkpoint", "path": "/tmp", "sha256": {"x": "0" * 64}}, "weights.kind disagrees"),
    (["weights"], {"kind": "dummy", "seed": "zero"}, "weights.seed"),
    (["weights"], {"kind": "pickle"}, "weights.kind"),
    (["weights"], [], "weights is not an object"),
    (["model_spec", "num_layers"], 3000, "model_spec.num_layers = 3000"),
    (["model_spec", "num_heads"], 0, "model_spec.num_heads"),
    (["model_spec", "hidden_size"], "64", "model_spec.hidden_size"),
    (["model_spec", "bogus"], 1, "model_spec"),
    (["plan", "resident"], [True], "plan.resident"),
    (["plan", "num_layers"], 3, "plan.num_layers differs"),
    (["plan", "recompute"], [[0, 0]] * 20, "plan.recompute has more rows than contexts"),
    (["plan", "recompute"], [["a", 0]] * 9, "plan.recompute rows"),
    (["plan", "gen_len"], 10 ** 12, "plan.gen_len"),
    (["plan", "max_context"], 10 ** 9, "plan.max_context = 1000000000"),
    (["plan", "max_context"], 600, "plan.max_context = 600 exceeds model_spec.max_positions (512)"),
    (["plan", "max_context"], 3, "plan.max_context = 3; expected an integer 16.."),
    (["plan", "recompute_runs"], [[1, [0, 0]]], "both recompute and recompute_runs"),
    (["plan", "micro_batches"], 10 ** 6, "plan.micro_batches"),
    (["plan", "forced_fraction"], float("nan"), "plan.forced_fraction"),
    (["plan", "mode"], ["pipelined"], "plan.mode"),
    (["plan"], "pipelined", "plan is not an object"),
    (["config", "workload", "batch_size"], 10 ** 12, "workload.batch_size"),
    (["config", "workload"], KeyError, None),
    (["hardware", "gpu_mem_gb"], "lots", "hardware.gpu_mem_gb"),
    (["hardware", "h2d_gbps"], float("inf"), "hardware.h2d_gbps = inf"),
    (["hardware"], KeyError, "no 'hardware'"),
    (["format"], "zip", "not a kvc artifact"),
    (["format_version"], True, "format version True"),
    (["kvc_version"], 1, "kvc_version is not a string"),
])
def test_manifest_fields_are_checked(artifact, tmp_path, keys, value, needle):
    a = _copy(artifact, tmp_path)
    _edit_manifest(a, lambda m: _deep(m, keys, value))
    t0 = time.perf_counter()
    with pytest.raises(KvcError) as e:
        art.read_manifest(a)
    assert time.perf_counter() - t0 < 2
    assert "\n" not in str(e.value)
    if needle:
        assert needle in str(e.value)


@pytest.fixture(scope="module")
def solved(tmp_path_factory):
    """An artifact whose plan the LP made (a table of runs, not a forced fraction), on a link
    slow enough that tiny-llama recomputes."""
    out = tmp_path_factory.mktemp("s") / "solved.kvc"
    return kvc.compile(TINY, overrides=["hardware.h2d_gbps=0.001", "workload.max_context=300",
                                        "schedule.chunk_tokens=4"], output=out)


def test_a_solved_plan_is_stored_as_runs_and_round_trips(solved):
    from kvc.ir.plan import Plan

    m = art.read_manifest(solved)
    d = m["plan"]
    assert "recompute" not in d and d["max_context"] == 300
    runs = d["recompute_runs"]
    assert runs[0][0] == 1 and len(runs) < 300 and all(len(r) == 2 for r in runs)
    plan = Plan.from_json(d)
    assert plan.context_range == (1, 300) and plan.covers(1) and plan.covers(300)
    assert not plan.covers(301)
    assert any(l > 0 for _, row in runs for l in row)
    assert Plan.from_json(json.loads(plan.dumps())) == plan
    assert json.loads(plan.dumps()) == json.loads(json.dumps(d, sort_keys=True))


def test_an_old_manifest_plan_still_loads(solved, tmp_path):
    """Manifests written before issue 15: `recompute` rows for contexts prompt_len..prompt_len +
    gen_len, no max_context."""
    from kvc.ir.plan import Plan

    a = _copy(solved, tmp_path)
    table = Plan.from_json(art.read_manifest(a)["plan"])

    def old(m):
        p = m["plan"]
        rows = table.recompute_table(range(8, 17))
        p["recompute"] = [list(r) for r in zip(*rows)]
        del p["recompute_runs"], p["max_context"], m["config"]["workload"]["max_context"]
    _edit_manifest(a, old)
    plan = Plan.from_json(art.read_manifest(a)["plan"])
    assert plan.max_context == 16 and plan.context_range == (8, 16)
    assert plan.covers(8) and plan.covers(16) and not plan.covers(7) and not plan.covers(17)
    assert [plan.recompute_tokens(u, s) for u in range(2) for s in range(8, 17)] == \
        [table.recompute_tokens(u, s) for u in range(2) for s in range(8, 17)]
    with pytest.raises(ValueError, match="covers contexts 8..16"):
        plan.recompute_tokens(1, 17)


@pytest.mark.parametrize("keys, value, needle", [
    (["plan", "recompute_runs"], [[1, [0, 0]], [1, [4, 4]]], "the contexts increasing"),
    (["plan", "recompute_runs"], [[1, [0]]], "rows must hold 2 token counts"),
    (["plan", "recompute_runs"], [[9, [0, 0]]], "start after the workload's prompt_len 8"),
    (["plan", "recompute_runs"], [[1, [0, 0]]] * 400, "more runs than contexts"),
    (["plan", "recompute_runs"], [[1, [-1, 0]]], "token counts 0..300"),
    (["plan", "recompute_runs"], "runs", "recompute_runs"),
    (["plan", "max_context"], 299, "plan.max_context differs from the config's workload.max_context"),
])
def test_damaged_runs_are_refused_in_one_line(solved, tmp_path, keys, value, needle):
    a = _copy(solved, tmp_path)
    _edit_manifest(a, lambda m: _deep(m, keys, value))
    with pytest.raises(KvcError) as e:
        art.read_manifest(a)
    assert "\n" not in str(e.value) and needle in str(e.value)


def test_crafted_3000_layer_manifest_is_refused_quickly(artifact, tmp_path, capsys):
    from kvc.cli import main

    a = _copy(artifact, tmp_path)

    def grow(m):
        m["model_spec"]["num_layers"] = m["plan"]["num_layers"] = 3000
        m["plan"]["resident"] = [False] * 3000
    _edit_manifest(a, grow)
    t0 = time.perf_counter()
    assert main(["inspect", str(a)]) == 2
    assert time.perf_counter() - t0 < 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model_spec.num_layers = 3000" in err[0]


# --------------------------------------------------------------------------- checkpoint files


@pytest.fixture
def ckpt(tmp_path):
    """A folder shaped like a safetensors checkpoint (check_weights only lists and hashes)."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def _entry(folder, **extra):
    files = {n: art.sha256_file(folder / n) for n in ("config.json", "model.safetensors")}
    return {"kind": "checkpoint", "path": str(folder), "sha256": {**files, **extra}}


def test_checkpoint_entry_reads_only_the_checkpoints_files(ckpt, tmp_path):
    assert art.check_weights(_entry(ckpt)) == str(ckpt)
    outside = tmp_path / "secret"
    outside.write_text("s")
    digest = art.sha256_file(outside)
    for name in ("../secret", "/etc/hostname", "../../../../etc/hostname", "a/../../secret", "./config.json"):
        with pytest.raises(KvcError, match="relative to the checkpoint folder"):
            art.check_weights(_entry(ckpt, **{name: digest}))
    (ckpt / "extra.safetensors").symlink_to(outside)
    with pytest.raises(KvcError, match="leads out of the checkpoint folder"):
        art.check_weights(_entry(ckpt, **{"extra.safetensors": digest}))
    (ckpt / "notes.txt").write_text("n")  # inside, but not a file the loader reads
    with pytest.raises(KvcError, match="differ from the folder's"):
        art.check_weights(_entry(ckpt, **{"notes.txt": art.sha256_file(ckpt / "notes.txt")}))


def test_checkpoint_weights_linking_out_are_refused(ckpt, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    (ckpt / "model.safetensors").rename(outside)
    (ckpt / "model.safetensors").symlink_to(outside)
    with pytest.raises(KvcError, match="leads out of the checkpoint folder"):
        art.check_weights(_entry(ckpt))


def test_hugging_face_cache_snapshot_links_are_read(tmp_path):
    """A Hugging Face cache snapshot's files link to its model's blobs/: that is inside."""
    model = tmp_path / "models--org--m"
    snap, blobs = model / "snapshots" / "rev1", model / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for name, data in (("config.json", b"{}"), ("model.safetensors", b"w")):
        (blobs / name.replace(".", "_")).write_bytes(data)
        (snap / name).symlink_to(Path("../../blobs") / name.replace(".", "_"))
    assert art.check_weights(_entry(snap)) == str(snap)

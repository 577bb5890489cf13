"""Fuzzing the two parsers a stranger can feed kvc (issue 16): model.yaml text and override
strings (kvc.config.load_config), and an artifact's manifest (kvc.artifact.read_manifest).
Whatever the input, the answer is a result or a KvcError, never another exception, within a
time bound (hypothesis' deadline) and a memory bound (the process's peak resident memory may
grow by at most MEMORY_BOUND over a test's examples: a billion laughs or a manifest that makes
kvc allocate by its numbers would blow through it).

Inputs are grown from valid ones: random text, YAML dumped from random structures under the
real keys, YAML with anchors, aliases and deep nesting spliced in, and manifests of a real
artifact with fields replaced, deleted or mistyped. Sized to run in well under a minute on
two cores (max_examples per test below).
"""
from __future__ import annotations

import functools
import json
import math
import resource
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvc
import kvc.artifact as art
from kvc.config import Config, load_config
from kvc.errors import KvcError

MEMORY_BOUND = 256 << 20  # growth of the peak resident set over one test's examples, bytes
FUZZ = settings(max_examples=100, deadline=2000, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
BASE = {"model": {"preset": "tiny-opt", "dtype": "float32"}, "hardware": "cpu",
        "workload": {"batch_size": 2, "prompt_len": 8, "gen_len": 8}}
SECTIONS = {
    "model": ["checkpoint", "preset", "dtype", "seed"],
    "workload": ["batch_size", "prompt_len", "gen_len", "num_gpu_batches"],
    "hardware": ["preset", "name", "device", "h2d_gbps", "gpu_mem_gb", "cpu_mem_gb", "mem_gbps",
                 "launch_us", "measured", "compute_slowdown"],
    "schedule": ["mode", "recompute_fraction", "weight_stream_fraction", "resident_cache",
                 "chunk_tokens", "act_chunks", "solver_time_limit_s", "cuda_graphs"],
}
KEYS = [f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks] + list(SECTIONS) + ["x", "model.x.y"]


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


_BASELINE: list[int] = []


@pytest.fixture(autouse=True)
def _fresh_baseline():
    """Each test measures from its own first example (after its fixtures were built)."""
    _BASELINE.clear()


def bounded(fn, *args):
    """fn(*args) -> its result, or None for a KvcError; any other exception fails the test,
    and so does a peak resident set MEMORY_BOUND above the first example's."""
    if not _BASELINE:
        _BASELINE.append(_peak_rss())
    try:
        return fn(*args)
    except KvcError as e:
        assert str(e) and "\n" not in str(e), repr(e)  # one line
        return None
    finally:
        grown = _peak_rss() - _BASELINE[0]
        assert grown < MEMORY_BOUND, f"peak memory grew by {grown / 2**20:.0f} MiB"


# --------------------------------------------------------------------------- values

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-3, 70000),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["tiny-opt", "tiny-llama", "cpu", "h200-pcie5", "auto", "pipelined", "kvpr",
                     "float16", "float32", "bfloat16", "cuda", "meta", "", "null", "~", ".inf", "-.inf",
                     ".nan", "1e400", "0x10", "${oc.env:HOME}", "???"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


@st.composite
def config_dicts(draw):
    """A config shaped like a model.yaml: the real sections and keys, random values, now and
    then an unknown key or a section that is not a mapping."""
    out = {}
    for section, keys in SECTIONS.items():
        if draw(st.booleans()):
            continue
        if draw(st.integers(0, 9)) == 0:
            out[section] = draw(values)
            continue
        out[section] = {k: draw(values) for k in draw(st.lists(st.sampled_from(keys), max_size=4))}
    if draw(st.booleans()):
        out.setdefault("model", {})
        if isinstance(out["model"], dict):
            out["model"].setdefault("preset", "tiny-opt")
    if draw(st.integers(0, 5)) == 0:
        out[draw(st.text(max_size=6))] = draw(values)
    return out


@st.composite
def yaml_texts(draw):
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.text(max_size=300))
    text = yaml.safe_dump(draw(config_dicts()), sort_keys=False)
    if kind == 1:  # spliced: anchors, aliases, merge keys, tags, nesting, junk
        lines = text.splitlines() or [""]
        at = draw(st.integers(0, len(lines)))
        piece = draw(st.sampled_from([
            "a: &a [x, x, x]", "b: [*a, *a, *a]", "<<: *a", "c: !!python/object:os.system {}",
            "d: " + "[" * draw(st.integers(1, 300)), "e: " + "{f: " * 50 + "1" + "}" * 50,
            "g: !!binary aGVsbG8=", "h: !!set {a, b}", "%YAML 1.1\n---", "---\n---", "\t", "'",
            "i: 2001-12-14t21:59:43.10-05:00", "j: 0o777", "k: 1_000", "? [a]\n: b"]))
        lines.insert(at, piece)
        return "\n".join(lines)
    if kind == 2:  # a character or two changed
        pos = draw(st.integers(0, max(0, len(text) - 1)))
        return text[:pos] + draw(st.text(max_size=3)) + text[pos + 1:]
    return text


overrides = st.one_of(
    st.text(max_size=60),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.text(max_size=20)),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS),
              scalars.map(lambda v: json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else str(v))),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.sampled_from(
        ["[1,2]", "{a: 1}", "inf", "-inf", "nan", "1e999", "${x}", "'a'", "\"\"", "null", "true",
         "choice(1,2)", "range(1,3)", "interval(0,1)", "tag(a, b)", "glob(*)", "1,2"])),
    st.sampled_from(["~model", "+x=1", "++x=1", "hardware=", "=", "a b=1", "workload.batch_size=="]),
)


# --------------------------------------------------------------------------- config


@FUZZ
@given(text=yaml_texts())
def test_model_yaml_text(text):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.yaml"
        p.write_text(text, encoding="utf-8", errors="surrogatepass") if _utf8(text) else p.write_bytes(
            text.encode("utf-8", "replace"))
        cfg = bounded(load_config, p)
    assert cfg is None or isinstance(cfg, Config)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@FUZZ
@given(data=config_dicts())
def test_config_dict(data):
    cfg = bounded(load_config, data)
    assert cfg is None or isinstance(cfg, Config)


@FUZZ
@given(strings=st.lists(overrides, min_size=1, max_size=3))
def test_override_strings(strings):
    cfg = bounded(load_config, BASE, strings)
    assert cfg is None or isinstance(cfg, Config)


# --------------------------------------------------------------------------- manifest


@functools.lru_cache(maxsize=1)
def _artifact() -> tuple[Path, dict]:
    root = Path(tempfile.mkdtemp(prefix="kvc-fuzz-"))
    a = kvc.compile({**BASE, "model": {"preset": "tiny-llama", "dtype": "float32"}},
                    ["schedule.mode=kvpr"], output=root / "a.kvc")
    return a, json.loads((a / art.MANIFEST).read_text())


@pytest.fixture(scope="module")
def artifact():
    a, manifest = _artifact()
    yield a, manifest
    shutil.rmtree(a.parent, ignore_errors=True)
    _artifact.cache_clear()


def _paths(node, prefix=()):
    """Every (path, value) in a JSON tree."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node[:6]):  # long tables: their first rows stand for the rest
            yield from _paths(v, prefix + (i,))


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2, 5000),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10),
              st.sampled_from(["../../etc/hostname", "/proc/kcore", "0" * 64, "kvc-artifact",
                               "dummy", "checkpoint", "pipelined"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10)


@st.composite
def manifests(draw, base: dict):
    m = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p, _ in _paths(m) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        how = draw(st.integers(0, 3))
        if how == 0 and isinstance(parent, dict):
            del parent[path[-1]]
        elif how == 1:  # a number nudged, or grown large
            v = parent[path[-1]]
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                parent[path[-1]] = draw(st.sampled_from([v + 1, v - 1, -v, v * 1000, 3000, 0, 10 ** 12]))
            else:
                parent[path[-1]] = draw(json_values)
        else:
            parent[path[-1]] = draw(json_values)
    return m


@FUZZ
@given(data=st.data())
def test_manifest(artifact, data):
    """A real artifact's manifest with fields replaced, deleted or mistyped: refused with a
    KvcError or accepted; what is accepted has the types the loader and inspect rely on."""
    path, base = artifact
    m = data.draw(manifests(base))
    raw = json.dumps(m, allow_nan=True)
    with tempfile.TemporaryDirectory() as d:
        a = Path(d) / "a.kvc"
        a.mkdir()
        (a / art.MANIFEST).write_text(raw)
        shutil.copy(path / art.GRAPH, a / art.GRAPH)
        got = bounded(art.read_manifest, a)
    if got is not None:  # what inspect and the loader read next holds
        from kvc.ir.plan import Plan
        from kvc.models.spec import ModelSpec

        spec, plan = ModelSpec.from_dict(got["model_spec"]), Plan.from_json(got["plan"])
        assert plan.num_layers == spec.num_layers <= 512


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                      st.integers(1, 5000).map(lambda n: "[" * n), st.integers(1, 5000).map(lambda n: '{"a":' * n)))
def test_manifest_text(artifact, text):
    path, _ = artifact
    with tempfile.TemporaryDirectory() as d:
        a = Path(d) / "a.kvc"
        a.mkdir()
        (a / art.MANIFEST).write_text(text, errors="surrogatepass")
        shutil.copy(path / art.GRAPH, a / art.GRAPH)
        assert bounded(art.read_manifest, a) is None

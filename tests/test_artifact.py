"""Compile -> artifact folder -> load: same tokens as the reference; damaged artifacts refused."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import kvc
from kvc.errors import KvcError
from kvc.models import build_model, preset
from kvc.runtime.reference import ReferenceDecoder
from kvc_fixtures import INTERRUPT_WHILE_WRITING

TINY = {"model": {"preset": "tiny-llama", "dtype": "float32"}, "hardware": "cpu",
        "workload": {"batch_size": 2, "prompt_len": 8, "gen_len": 8}}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("a") / "tiny.kvc"
    return kvc.compile(TINY, overrides=["schedule.recompute_fraction=0.5"], output=out)


def test_folder_contents(artifact):
    assert sorted(p.name for p in artifact.iterdir()) == ["graph.py", "manifest.json"]
    m = json.loads((artifact / "manifest.json").read_text())
    for key in ("format_version", "kvc_version", "torch_version", "config", "hardware", "plan",
                "code_hash", "weights", "model_spec"):
        assert key in m
    assert m["weights"] == {"kind": "dummy", "preset": "tiny-llama", "seed": 0}
    graph = (artifact / "graph.py").read_text()
    assert "offload_kv_1" in graph and "prefetch_kv_1" in graph and "staged_act_1_0" in graph


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
    import shutil

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


def test_compile_replaces_atomically_and_leaves_no_temp(tmp_path):
    out = tmp_path / "x.kvc"
    kvc.compile(TINY, overrides=["schedule.recompute_fraction=0"], output=out)
    kvc.compile(TINY, overrides=["schedule.recompute_fraction=1"], output=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.kvc"]
    (tmp_path / "plain").mkdir()
    with pytest.raises(KvcError, match="not a kvc artifact"):
        kvc.compile(TINY, output=tmp_path / "plain")


def test_interrupted_compile_leaves_nothing(tmp_path):
    """Ctrl-C while the artifact is being written: no folder, no temporary left behind."""
    script = INTERRUPT_WHILE_WRITING + textwrap.dedent(f"""
        import kvc
        kvc.compile({TINY!r}, overrides=["schedule.recompute_fraction=0.5"], output={str(tmp_path / 'y.kvc')!r})
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode != 0 and "KeyboardInterrupt" in r.stderr
    assert list(tmp_path.iterdir()) == []

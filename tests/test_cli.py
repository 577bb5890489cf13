"""The `kvc` command: main job on a CPU, and one clear line + non-zero exit on bad input."""
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def kvc(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kvc.cli", *map(str, args)],
                          check=False, capture_output=True, text=True, cwd=cwd)


def test_help_lists_commands():
    r = kvc("--help")
    assert r.returncode == 0
    for c in ("compile", "profile", "plan", "run", "bench"):
        assert c in r.stdout


def test_compile_and_run_example(tmp_path):
    r = kvc("compile", EXAMPLES / "tiny-opt.yaml", "-o", tmp_path / "t.kvc", "schedule.recompute_fraction=0.5")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t.kvc" / "manifest.json").is_file()
    r = kvc("run", tmp_path / "t.kvc", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert "meaningless" in r.stderr and "tokens/s" in r.stderr
    assert len(r.stdout.split("\n")[0].split()) == 4


def _one_line_error(r, needle):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvc: error:") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_missing_file(tmp_path):
    _one_line_error(kvc("compile", tmp_path / "nope.yaml"), "no such file")


def test_yaml_syntax_error(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("model: {preset: tiny-opt\n  dtype: [\n")
    _one_line_error(kvc("compile", p), "YAML syntax error")


def test_unknown_key(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("model: {preset: tiny-opt}\nhardware: cpu\nworkload: {batch: 2}\n")
    _one_line_error(kvc("compile", p), "unknown key 'workload.batch'")


@pytest.mark.parametrize("override, needle", [
    ("workload.batch_size==3", "bad override"),
    ("hardware.h2d_gbps=-1", "hardware.h2d_gbps = -1.0"),
    ("hardware=nope", "unknown hardware option"),
])
def test_bad_override(override, needle):
    _one_line_error(kvc("compile", EXAMPLES / "tiny-opt.yaml", override), needle)


def test_debug_shows_traceback(tmp_path):
    r = kvc("--debug", "compile", tmp_path / "nope.yaml")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_damaged_artifact_run(tmp_path):
    (tmp_path / "a.kvc").mkdir()
    _one_line_error(kvc("run", tmp_path / "a.kvc"), "not a kvc artifact")


def test_version():
    from kvc.version import __version__

    r = kvc("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"kvc {__version__}"

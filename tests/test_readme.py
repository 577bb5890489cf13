"""The README's code runs as written: its Python snippet from a folder outside the repository
(the installed kvc, PYTHONSAFEPATH from conftest), and its set-up section keeps the two
commands `.ci/run` reads."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.MULTILINE | re.DOTALL)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def test_python_snippet_runs_from_any_folder(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", section("Python"), re.DOTALL)
    assert blocks, "README's Python section has no ```python block"
    code = "\n".join(blocks)
    code += "\nassert tokens.shape == (2, 32) and logits.shape[:2] == (2, 16), (tokens.shape, logits.shape)\n"
    env = {**os.environ, "PYTHONSAFEPATH": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "tiny.kvc" / "manifest.json").is_file()


def test_setup_keeps_its_two_commands():
    blocks = re.findall(r"```\n(.*?)```", section("Set up"), re.DOTALL)
    assert [b.strip() for b in blocks] == [
        ("pip install torch==2.13.0 && pip install . && kvc compile examples/tiny-opt.yaml -o "
         "tiny-opt.kvc && kvc run tiny-opt.kvc"),
        "pip install torch==2.13.0 && pip install '.[test]' && pytest -q -n auto",
    ]

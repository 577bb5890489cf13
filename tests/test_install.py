"""A plain (non-editable) install carries conf/ and passes/ inside the package: kvc.conf and
kvc.passes resolve from site-packages, from a folder outside the source tree."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_plain_install_finds_configs_and_passes(tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--no-build-isolation", "--target", str(target), str(REPO)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (target / "kvc" / "conf" / "hardware" / "h100-pcie5.yaml").is_file()
    assert (target / "kvc" / "passes" / "streams.py").is_file()
    script = (
        "import kvc, kvc.passes.pipeline, kvc.conf\n"
        "from kvc.config import load_config, group_options\n"
        "assert kvc.__file__.startswith(%r), kvc.__file__\n"
        "cfg = load_config({'model': {'preset': 'tiny-opt'}}, ['hardware=h100-pcie5'])\n"
        "assert cfg.hardware.h2d_gbps > 0 and 'pipelined' in group_options('schedule')\n"
        "out = kvc.compile({'model': {'preset': 'tiny-opt', 'dtype': 'float32'}, 'hardware': 'cpu',"
        " 'workload': {'batch_size': 1, 'prompt_len': 4, 'gen_len': 2}}, output='a.kvc')\n"
        "print(kvc.load(out, device='cpu').generate(__import__('torch').tensor([[1, 2, 3, 4]]), 2).shape)\n"
    ) % str(target)
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "torch.Size([1, 6])" in run.stdout

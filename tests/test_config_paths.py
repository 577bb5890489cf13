"""Paths in a config: `hardware=hw.yaml` (or `hardware.file=`) uses a profile as `kvc profile
-o` writes it; a relative model.checkpoint is resolved (against the model.yaml's folder, or
the current one for overrides) and stored absolute, so an artifact loads from anywhere."""
import json
import os
from dataclasses import asdict

import pytest

from kvc.config import load_config
from kvc.errors import KvcError
from kvc.hardware import HardwareConfig

TINY = {"model": {"preset": "tiny-opt", "dtype": "float32"}}


@pytest.fixture
def profile(tmp_path):
    """A profile written by the function `kvc profile -o` writes with."""
    from kvc.profiler.resolve import write_profile_yaml

    hw = HardwareConfig(name="profiled", device="cpu", h2d_gbps=31.5, d2h_gbps=30.0, bidir_gbps=25.0,
                        gemm_tflops=0.07, gemm_half_rows=99.0, attn_gbps=5.5, mem_gbps=6.5,
                        gpu_mem_gb=7.0, host_op_us=9.25,
                        measured={"machine": "test box", "date": "2026-12-01", "torch": "2.13.0",
                                  "cuda": "", "device_name": "cpu"})
    path = tmp_path / "prof" / "hw.yaml"
    write_profile_yaml(hw, path)
    return hw, path


def test_profile_round_trips_through_hardware_override(profile, monkeypatch):
    hw, path = profile
    assert load_config(TINY, [f"hardware={path}"]).hardware == hw
    monkeypatch.chdir(path.parent.parent)
    assert load_config(TINY, ["hardware=prof/hw.yaml"]).hardware == hw
    monkeypatch.chdir(path.parent)
    assert load_config(TINY, ["hardware=hw.yaml"]).hardware == hw
    assert load_config(TINY, ["hardware.file=hw.yaml"]).hardware == hw
    # fields given after the file win over it; a later preset replaces it; so does a later file
    cfg = load_config(TINY, ["hardware=hw.yaml", "hardware.h2d_gbps=40"])
    assert cfg.hardware.h2d_gbps == 40.0 and cfg.hardware.gemm_tflops == hw.gemm_tflops
    assert load_config(TINY, ["hardware=hw.yaml", "hardware=a100-pcie4"]).hardware.name == "a100-pcie4"
    assert load_config(TINY, ["hardware=a100-pcie4", "hardware=hw.yaml"]).hardware == hw


def test_profile_named_in_model_yaml_is_beside_it(profile, tmp_path, monkeypatch):
    hw, path = profile
    (path.parent / "m.yaml").write_text("model: {preset: tiny-opt}\nhardware: hw.yaml\n")
    (path.parent / "m2.yaml").write_text("model: {preset: tiny-opt}\nhardware: {file: hw.yaml, gpu_mem_gb: 3}\n")
    monkeypatch.chdir(tmp_path)  # not the profile's folder
    assert load_config(path.parent / "m.yaml").hardware == hw
    cfg = load_config(path.parent / "m2.yaml")
    assert cfg.hardware.gpu_mem_gb == 3.0 and cfg.hardware.h2d_gbps == hw.h2d_gbps
    # the command line beats the file's choice
    assert load_config(path.parent / "m.yaml", ["hardware=cpu"]).hardware.name == "cpu"


def test_profile_used_as_measured_not_remeasured(profile):
    from kvc.profiler.resolve import resolve_hardware

    hw, path = profile
    cfg = load_config(TINY, [f"hardware={path}"])
    assert resolve_hardware(cfg.hardware) == hw


def test_hand_written_profile_takes_the_file_name(tmp_path):
    (tmp_path / "lab-box.yml").write_text("device: cpu\nh2d_gbps: 12\n")
    hw = load_config(TINY, [f"hardware={tmp_path / 'lab-box.yml'}"]).hardware
    assert hw.name == "lab-box" and hw.h2d_gbps == 12.0 and hw.d2h_gbps == HardwareConfig().d2h_gbps


@pytest.mark.parametrize("text, match", [
    ("h2d_gbps: 10\nwarp_speed: 9\n", r"hw\.yaml: unknown key 'hardware\.warp_speed'"),
    ("h2d_gbps: fast\n", r"hw\.yaml: hardware\.h2d_gbps = 'fast' has the wrong type"),
    ("h2d_gbps: -1\n", r"hardware\.h2d_gbps = -1\.0; expected a positive number"),
    ("- 1\n- 2\n", r"hw\.yaml: expected a mapping of hardware fields"),
    ("a: [\n", r"hw\.yaml"),
])
def test_bad_profile_is_one_line(tmp_path, text, match):
    (tmp_path / "hw.yaml").write_text(text)
    with pytest.raises(KvcError, match=match) as e:
        load_config(TINY, [f"hardware={tmp_path / 'hw.yaml'}"])
    assert "\n" not in str(e.value)


def test_missing_profile_and_unknown_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KvcError, match=r"hardware profile .*nope\.yaml not found; `kvc profile -o nope\.yaml`"):
        load_config(TINY, ["hardware=nope.yaml"])
    with pytest.raises(KvcError, match=r"not found"):
        load_config(TINY, ["hardware.file=dir/none"])
    with pytest.raises(KvcError, match=r"unknown hardware option 'nope'; expected one of .* or a profile's path"):
        load_config(TINY, ["hardware=nope"])
    (tmp_path / "m.yaml").write_text("model: {preset: tiny-opt}\nhardware: {file: hw.yaml, preset: cpu}\n")
    with pytest.raises(KvcError, match="both 'file' and 'preset'"):
        load_config(tmp_path / "m.yaml")


def test_plan_command_reads_a_profile(profile, capsys):
    from kvc.cli import main

    _, path = profile
    code = main(["plan", os.path.join(os.path.dirname(__file__), "..", "examples", "tiny-opt.yaml"),
                 f"hardware={path}", "--json"])
    assert code in (0, None)
    assert "profiled" in capsys.readouterr().out


# --------------------------------------------------------------------------- model.checkpoint


def test_relative_checkpoint_in_model_yaml_is_beside_it(tmp_path, monkeypatch):
    (tmp_path / "cfgs" / "ckpt").mkdir(parents=True)
    (tmp_path / "cfgs" / "m.yaml").write_text("model: {checkpoint: ckpt}\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("cfgs/m.yaml").model.checkpoint == str(tmp_path / "cfgs" / "ckpt")
    # on the command line (or in a dict): the current folder
    assert load_config("cfgs/m.yaml", ["model.checkpoint=other"]).model.checkpoint == str(tmp_path / "other")
    assert load_config({"model": {"checkpoint": "x/../y"}}).model.checkpoint == str(tmp_path / "y")


def test_checkpoint_relative_to_the_current_folder_still_found(tmp_path, monkeypatch):
    """Before, a model.yaml's checkpoint was read relative to the current folder: where only
    that folder has it, it is still found."""
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "cfgs" / "m.yaml").write_text("model: {checkpoint: ckpt}\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("cfgs/m.yaml").model.checkpoint == str(tmp_path / "ckpt")


def test_home_in_checkpoint_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config({"model": {"checkpoint": "~/ckpt"}}).model.checkpoint == str(tmp_path / "ckpt")


def test_artifact_of_a_relative_checkpoint_loads_from_elsewhere(tmp_path, monkeypatch, one_thread):
    pytest.importorskip("transformers")
    import torch
    from hf_fixtures import hf_model, save_checkpoint

    import kvc
    from kvc.config import Config, ModelConfig, WorkloadConfig

    work = tmp_path / "work"
    save_checkpoint(hf_model("opt-preln"), work / "models" / "opt")
    (work / "m.yaml").write_text("model: {checkpoint: models/opt, dtype: float32}\n"
                                 "workload: {batch_size: 1, prompt_len: 4, gen_len: 4}\nhardware: cpu\n"
                                 "schedule: {mode: pipelined}\n")
    monkeypatch.chdir(work)
    art = kvc.compile("m.yaml", output="a.kvc")
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["config"]["model"]["checkpoint"] == str(work / "models" / "opt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = kvc.load(work / "a.kvc", device="cpu")
    try:
        out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=2)
        tokens = out[0] if isinstance(out, tuple) else out
        assert tokens.shape[-1] >= 2
    finally:
        getattr(model, "close", lambda: None)()
    # a Config built in code with a relative path is stored absolute too
    monkeypatch.chdir(work)
    cfg = Config(model=ModelConfig(checkpoint="models/opt", dtype="float32"),
                 workload=WorkloadConfig(batch_size=1, prompt_len=4, gen_len=4),
                 hardware=load_config({"hardware": "cpu", "model": {"preset": "tiny-opt"}}).hardware)
    art2 = kvc.compile(cfg, output="b.kvc")
    stored = json.loads((art2 / "manifest.json").read_text())["config"]["model"]["checkpoint"]
    assert stored == str(work / "models" / "opt")


def test_profile_fields_match_hardware_config():
    # every field the profile writer writes is one the override reads
    assert set(asdict(HardwareConfig())) >= {"name", "measured", "h2d_gbps"}

"""Config: defaults < model.yaml < overrides, validated into dataclasses with one-line errors."""
import pytest

from kvc.config import check_fits_model, load_config
from kvc.errors import KvcError

BASE = {"model": {"preset": "tiny-opt", "dtype": "float32"}, "hardware": "cpu"}


def write(tmp_path, text):
    p = tmp_path / "model.yaml"
    p.write_text(text)
    return p


def test_defaults_then_file_then_overrides(tmp_path):
    p = write(tmp_path, "model: {preset: tiny-opt}\nhardware: h100-pcie5\n"
                        "workload: {batch_size: 4}\nschedule: {mode: kvpr}\n")
    cfg = load_config(p, ["hardware.h2d_gbps=40", "workload.batch_size=8"])
    assert cfg.hardware.name == "h100-pcie5"
    assert cfg.hardware.h2d_gbps == 40.0  # override beats the preset
    assert cfg.workload.batch_size == 8  # override beats the file
    assert cfg.workload.gen_len == 32  # untouched default
    assert cfg.schedule.mode == "kvpr" and cfg.schedule.act_chunks == 1  # kvpr's defaults


def test_group_choice_from_override_beats_file(tmp_path):
    p = write(tmp_path, "model: {preset: tiny-opt}\nhardware: cpu\n")
    assert load_config(p, ["hardware=a100-pcie4"]).hardware.name == "a100-pcie4"
    assert load_config(p, ["schedule.mode=full_offload"]).schedule.mode == "full_offload"


def test_hardware_mapping_with_preset_and_fields():
    cfg = load_config({"model": {"preset": "tiny-opt"},
                       "hardware": {"preset": "h200-pcie5", "gpu_mem_gb": 24}})
    assert cfg.hardware.name == "h200-pcie5" and cfg.hardware.gpu_mem_gb == 24.0


def test_dict_and_path_agree(tmp_path):
    p = write(tmp_path, "model: {preset: tiny-opt, dtype: float32}\nhardware: cpu\n")
    assert load_config(p) == load_config(BASE)


@pytest.mark.parametrize("data, overrides, needle", [
    ({"workload": {"batchsize": 2}}, [], "unknown key 'workload.batchsize'"),
    ({"wrkload": {}}, [], "unknown key 'wrkload'"),
    ({}, ["hardware.nope=1"], "unknown key 'hardware.nope'"),
    ({"workload": {"batch_size": "two"}}, [], "workload.batch_size = 'two' has the wrong type"),
    ({"workload": {"batch_size": 1.5}}, [], "workload.batch_size = 1.5 has the wrong type"),
    ({"model": {"preset": "tiny-opt", "dtype": "int8"}}, [], "model.dtype = 'int8'"),
    ({}, ["workload.batch_size=0"], "workload.batch_size = 0"),
    ({}, ["hardware.h2d_gbps=-5"], "hardware.h2d_gbps = -5.0"),
    ({}, ["hardware.h2d_gbps=0"], "hardware.h2d_gbps = 0.0"),
    ({}, ["schedule.recompute_fraction=1.5"], "schedule.recompute_fraction"),
    ({}, ["hardware=tpu"], "unknown hardware option 'tpu'"),
    ({}, ["schedule.mode=fastest"], "unknown schedule option 'fastest'"),
    ({}, ["workload.batch_size=="], "bad override"),
    ({}, ["~workload"], "bad override"),
])
def test_bad_values_are_one_line_errors(data, overrides, needle):
    cfg = {**BASE, **data}
    if "model" in data:
        cfg["model"] = data["model"]
    with pytest.raises(KvcError) as e:
        load_config(cfg, overrides)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_file_errors(tmp_path):
    with pytest.raises(KvcError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = write(tmp_path, "model: {preset: tiny-opt\nworkload: [\n")
    with pytest.raises(KvcError, match=r"YAML syntax error at line \d+"):
        load_config(bad)
    with pytest.raises(KvcError, match="expected a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_model_needs_exactly_one_source():
    with pytest.raises(KvcError, match="exactly one of model.checkpoint"):
        load_config({"hardware": "cpu"})


def test_prompt_plus_generation_within_max_positions():
    cfg = load_config(BASE, ["workload.prompt_len=500", "workload.gen_len=20"])
    with pytest.raises(KvcError, match="exceeds the model's maximum positions"):
        check_fits_model(cfg, max_positions=512)
    check_fits_model(cfg, max_positions=520)


def test_host_hydra_is_left_alone():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_module(config_module="kvc.conf", version_base=None):
        load_config(BASE)
        assert GlobalHydra.instance().is_initialized()
        compose(config_name="config")  # the host's Hydra still works
    assert not GlobalHydra.instance().is_initialized()

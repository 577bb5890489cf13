"""Config: defaults < model.yaml < overrides, validated into dataclasses with one-line errors."""
import contextlib
import signal
import threading

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
    ({}, ["schedule.cpu_attention=on"], "schedule.cpu_attention = 'on'; expected one of ['auto', 'off']"),
    ({}, ["schedule.cpu_attention_fraction=2"], "schedule.cpu_attention_fraction = 2.0; expected null or 0..1"),
    # YAML 1.1 reads an unquoted off as false: the line says to quote it
    ({"schedule": {"cpu_attention": False}}, [],
     ('schedule.cpu_attention = False: YAML reads an unquoted off/on/no/yes as a boolean; expected a '
      'string: quote it (cpu_attention: "off")')),
    ({}, ["schedule.mode=gpu_resident", "schedule.cpu_attention_fraction=0.5"],
     "keeps the cache on the GPU"),
    ({}, ["schedule.recompute_fraction=0.75", "schedule.cpu_attention_fraction=0.5"],
     "they split the same tokens"),
    ({}, ["hardware.cpu_attn_gbps=-1"], "hardware.cpu_attn_gbps = -1.0; expected a number >= 0"),
    ({}, ["hardware.cpu_attn_threads=-2"], "hardware.cpu_attn_threads = -2"),
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


def test_max_context_defaults_to_null_and_is_bounded():
    cfg = load_config(BASE, ["workload.prompt_len=500", "workload.gen_len=20"])
    assert cfg.workload.max_context is None  # the model's positions, as memory allows
    assert load_config(BASE, ["workload.max_context=520"]).workload.max_context == 520
    with pytest.raises(KvcError, match=r"^workload.max_context = 519; expected null .* integer "
                                       r"520\.\.\d+ \(at least workload.prompt_len \+ "
                                       r"workload.gen_len\)$"):
        load_config(BASE, ["workload.prompt_len=500", "workload.gen_len=20",
                           "workload.max_context=519"])
    with pytest.raises(KvcError, match="workload.max_context = 4194305"):
        load_config(BASE, [f"workload.max_context={(1 << 22) + 1}"])
    with pytest.raises(KvcError, match="workload.max_context = 'long' has the wrong type"):
        load_config(BASE, ["workload.max_context=long"])
    cfg = load_config(BASE, ["workload.max_context=1024"])
    check_fits_model(cfg, max_positions=1024)
    with pytest.raises(KvcError, match=r"^workload.max_context = 1024 exceeds the model's maximum "
                                       r"positions \(512\); use at most 512, or null for that$"):
        check_fits_model(cfg, max_positions=512)


def test_host_hydra_is_left_alone():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_module(config_module="kvc.conf", version_base=None):
        load_config(BASE)
        assert GlobalHydra.instance().is_initialized()
        compose(config_name="config")  # the host's Hydra still works
    assert not GlobalHydra.instance().is_initialized()


# --------------------------------------------------------------------------- hostile input


def _laughs(levels: int = 9) -> str:
    """A "billion laughs": each level names the previous one nine times (9**levels leaves)."""
    lines = ["model: {preset: tiny-opt}", "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def time_limit(seconds: float):
    """TimeoutError once `seconds` have passed (SIGALRM; main thread only, else no limit):
    a defect that makes kvc expand or loop fails the test at once instead of hanging it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    before = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def test_yaml_aliases_are_refused_before_expanding(tmp_path):
    import tracemalloc

    p = write(tmp_path, _laughs())
    assert len(p.read_bytes()) < 1000
    tracemalloc.start()
    try:
        with time_limit(5), pytest.raises(KvcError, match=r"line 3, column \d+: YAML aliases \(\*a0\) are not supported"):
            load_config(p)
        assert tracemalloc.get_traced_memory()[1] < 50 << 20
    finally:
        tracemalloc.stop()
    # a merge key is an alias too
    with pytest.raises(KvcError, match="YAML aliases"):
        load_config(write(tmp_path, "x: &x {batch_size: 2}\nworkload:\n  <<: *x\n"))
    assert load_config(write(tmp_path, "model: &m {preset: tiny-opt}\n")).model.preset == "tiny-opt"


def test_nesting_is_bounded(tmp_path):
    # refused while composing, where the text says: the line and column of the level too many
    with time_limit(10), pytest.raises(KvcError, match=r"line 1, column \d+: nested deeper than"):
        load_config(write(tmp_path, "model: " + "[" * 5000 + "]" * 5000 + "\n"))
    with pytest.raises(KvcError, match=r"line 1, column \d+: nested deeper than"):
        load_config(write(tmp_path, "model: " + "{a: " * 100 + "1" + "}" * 100 + "\n"))
    loop: dict = {"model": {"preset": "tiny-opt"}}
    loop["workload"] = loop  # a dict that contains itself
    with pytest.raises(KvcError, match="nested deeper than"):
        load_config(loop)


def test_model_yaml_size_is_capped(tmp_path):
    import time

    p = tmp_path / "big.yaml"
    p.write_text("model: {preset: tiny-opt}\n" + "# padding\n" * 400_000)  # 4 MB
    t0 = time.perf_counter()
    with pytest.raises(KvcError, match="larger than 1024 KiB"):
        load_config(p)
    assert time.perf_counter() - t0 < 1


def test_overrides_are_capped():
    with pytest.raises(KvcError, match="longer than 4096 characters"):
        load_config(BASE, ["hardware.name=" + "x" * 5000])
    with pytest.raises(KvcError, match="expected at most 1000"):
        load_config(BASE, ["workload.batch_size=2"] * 1001)


@pytest.mark.parametrize("data, overrides, needle", [
    ({}, ["hardware.gpu_mem_gb=inf"], "hardware.gpu_mem_gb = inf; expected a finite number"),
    ({"hardware": {"preset": "cpu", "gpu_mem_gb": float("inf")}}, [], "hardware.gpu_mem_gb = inf"),
    ({}, ["hardware.gpu_mem_gb=nan"], "hardware.gpu_mem_gb = nan"),
    ({}, ["hardware.h2d_gbps=-inf"], "hardware.h2d_gbps = -inf"),
    ({}, ["hardware.gpu_mem_gb=1e300"], "hardware.gpu_mem_gb = 1e+300"),
    ({}, ["hardware.launch_us=-1"], "hardware.launch_us = -1.0"),
    ({}, ["hardware.device=mps"], "hardware.device = 'mps'"),
    ({}, ["schedule.solver_time_limit_s=nan"], "schedule.solver_time_limit_s = nan"),
    ({}, ["schedule.solver_time_limit_s=-1"], "schedule.solver_time_limit_s = -1.0"),
    ({}, ["schedule.solver_time_limit_s=0"], "schedule.solver_time_limit_s = 0.0"),
    ({}, ["schedule.solver_time_limit_s=inf"], "schedule.solver_time_limit_s = inf"),
    ({}, ["workload.batch_size=1000000000000"], "workload.batch_size = 1000000000000"),
    ({}, ["workload.prompt_len=4000000", "workload.gen_len=1000000"], "prompt_len + workload.gen_len"),
    ({}, ["workload.num_gpu_batches=1000"], "workload.num_gpu_batches = 1000"),
    ({}, ["schedule.act_chunks=100000"], "schedule.act_chunks = 100000"),
    ({}, ["model.seed=-1"], "model.seed = -1"),
    ({"hardware": {"preset": "cpu", "h2d_gbps": 10 ** 400}}, [], "too large"),
])
def test_numbers_must_be_finite_and_bounded(data, overrides, needle):
    cfg = {**BASE, **data}
    with pytest.raises(KvcError) as e:
        load_config(cfg, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)

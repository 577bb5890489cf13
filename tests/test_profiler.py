"""Profiler: CPU measurement, the YAML it writes, and `hardware=auto` caching."""
import dataclasses
import time

import pytest
import torch
import yaml

from kvc import progress
from kvc.profiler import measure as profiler
from kvc.profiler import resolve
from kvc.errors import KvcError
from kvc.hardware import HardwareConfig


@pytest.fixture(scope="module")
def cpu_profile():
    t = time.perf_counter()
    hw = profiler.profile("cpu", progress=False)
    return hw, time.perf_counter() - t


def test_cpu_profile_is_quick_and_positive(cpu_profile):
    hw, took = cpu_profile
    assert took < 30  # the budget is ~20 s on 2 busy cores; leave CI some slack
    assert hw.device == "cpu"
    for f in ("h2d_gbps", "d2h_gbps", "bidir_gbps", "gemm_tflops", "attn_gbps", "mem_gbps", "gpu_mem_gb",
              "cpu_mem_gb", "launch_us", "host_module_us", "host_op_us", "host_view_us", "host_kvc_us"):
        assert getattr(hw, f) > 0, f
    # the host lane's kinds differ: a view issues no kernel and calls no module
    assert hw.host_view_us < hw.host_module_us
    assert hw.compute_slowdown >= 1 and hw.copy_slowdown >= 1
    assert hw.bidir_gbps <= min(hw.h2d_gbps, hw.d2h_gbps)
    for k in ("machine", "date", "torch", "device_name"):
        assert hw.measured[k]
    # no CPU attention lane beside a CPU "device" (it is the CPU itself): the planner plans none
    assert hw.cpu_attn_gbps == 0


def test_profile_yaml_round_trips_and_is_a_flat_hardware_mapping(cpu_profile, tmp_path):
    hw = cpu_profile[0]
    path = tmp_path / "sub" / "mine.yaml"
    resolve.write_profile_yaml(hw, path)
    text = path.read_text()
    assert text.startswith("# kvc profile of")
    data = yaml.safe_load(text)
    assert "defaults" not in data and set(data) == {f.name for f in dataclasses.fields(HardwareConfig)}
    assert resolve.read_profile_yaml(path) == hw


def test_fit_affine_recovers_latency_and_rate():
    a, b = profiler._fit_affine([1e3, 1e5, 1e7], [10e-6 + x / 20e9 for x in (1e3, 1e5, 1e7)])
    assert a == pytest.approx(10e-6, rel=1e-6) and 1 / b == pytest.approx(20e9, rel=1e-6)
    a, b = profiler._fit_affine([1, 2, 4], [5.0, 4.0, 3.0])  # noise: no growth seen
    assert a >= 0 and b > 0


def test_profile_steps_go_through_the_one_progress_bar(monkeypatch):
    seen = []

    class Recorder(progress._Quiet):
        def update(self, n=1):
            self.n += n

        def set_description(self, desc):
            seen.append(desc)

    monkeypatch.setattr(progress, "bar", lambda *a, **k: Recorder())
    stages = profiler._Stages(True)
    for what in profiler.STEPS:
        stages.step(what)
    stages.finish()
    assert stages.bar.n == len(profiler.STEPS)
    assert seen == [f"kvc profile ({w})" for w in profiler.STEPS]


def test_resolve_hardware_profiles_once_and_keeps_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def fake(device, progress=True, dtype=None):
        calls.append(device)
        return HardwareConfig(name="profiled", device=device, h2d_gbps=3.0, gemm_tflops=0.5,
                              measured={"machine": "m"})

    monkeypatch.setattr(resolve, "profile", fake)
    named = HardwareConfig(name="h100-pcie5")
    assert resolve.resolve_hardware(named) is named
    got = resolve.resolve_hardware(HardwareConfig(name="auto", gemm_tflops=9.0))
    assert calls and got.h2d_gbps == 3.0 and got.gemm_tflops == 9.0  # the override wins
    again = resolve.resolve_hardware(HardwareConfig(name="auto"))
    assert len(calls) == 1 and again.gemm_tflops == 0.5
    path = resolve.cache_path(calls[0])
    assert path.is_file() and str(path).startswith(str(tmp_path / "kvc"))
    assert "torch" in path.name
    # a profiler that measures differently does not reuse the old profile
    monkeypatch.setattr(resolve, "PROFILE_VERSION", resolve.PROFILE_VERSION + 1)
    resolve.resolve_hardware(HardwareConfig(name="auto"))
    assert len(calls) == 2 and resolve.cache_path(calls[0]) != path


def test_profile_cuda_without_cuda_is_a_kvc_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(KvcError, match="no CUDA"):
        profiler.profile("cuda", progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_profile():
    hw = profiler.profile("cuda", progress=False)
    assert hw.device == "cuda" and hw.h2d_gbps > 1 and hw.gemm_tflops > 1
    assert hw.measured["cuda"] and hw.gpu_mem_gb > 1


def test_the_cpu_lanes_kernel_reads_a_ring_larger_than_the_caches(monkeypatch):
    """kvc.profiler.cpu_lane times each call over the next K,V of a ring of at least
    RING_BYTES (a step reads every layer's rows once, never from a warm cache)."""
    from kvc.profiler import cpu_lane

    seen = []
    monkeypatch.setattr(cpu_lane, "RING_BYTES", 1 << 20)
    monkeypatch.setattr(cpu_lane, "partial_attention", lambda q, k, v, scale: seen.append(k.data_ptr()))
    shape = (2, 2, 64, 16)  # K,V 16 KB each in float32: a 1 MB ring holds 32 pairs
    cpu_lane.kernel_s(torch.randn(2, 4, 16), shape, torch.float32, reps=5)
    assert len(set(seen)) == 32 and len(seen) == 32 + 5
    assert seen[32:] == seen[:5]  # after one turn of warm-up, the least recently read first

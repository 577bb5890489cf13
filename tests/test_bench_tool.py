"""tools/bench.py's profile summary files kernels by the names an H200 trace gave them."""
from __future__ import annotations

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("bench", Path(__file__).parents[1] / "tools" / "bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_kernel_kinds_from_an_h200_trace():
    names = {  # abridged as the trace shows them
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, "
        "false, cutlass::half_t, Flash_kernel_traits<128, 128, 64, 4, cutlass::half_t> > >": "attention",
        "cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16_knob_35_16x128x128_1x": "attention",
        "nvjet_sm90_hsh_192x192_64x4_2x1_v_bz_coopB_bias_TNN": "gemm",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float, __half, float, __half>": "gemm",
        "Memcpy HtoD (Pinned -> Device)": "copy",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half, float>": "elementwise",
    }
    assert {n: bench.kernel_kind(n) for n in names} == names

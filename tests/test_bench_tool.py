"""tools/bench.py's profile summary files kernels by the names an H200 trace gave them; the
bench's modules and tools/repredict.py import from a checkout (tools/ is the scripts' folder)."""
from __future__ import annotations

import sys
from pathlib import Path

TOOLS = Path(__file__).parents[1] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import bench
import repredict
from benchlib import env


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


def test_bench_reads_the_run_state_from_env():
    """main sets benchlib.env; bench.X and repredict read it there, never a copy."""
    assert bench.DTYPE_NAME is env.DTYPE_NAME and bench.HOST_OVERRIDES is env.HOST_OVERRIDES
    assert repredict.planned is bench.planned and repredict.point_budget_gb is bench.point_budget_gb


def test_bench_modules_stay_small():
    for path in [TOOLS / "bench.py", *sorted((TOOLS / "benchlib").glob("*.py"))]:
        assert len(path.read_text().splitlines()) < 400, path

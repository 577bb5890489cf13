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


def test_lane_rows_compare_logits_only_along_the_same_tokens():
    """Two exact schedules in fp16 may pick different tokens at a near tie; after that a row's
    logits follow another text: the lane bench compares each row up to its first other token
    (that step's logits included) and counts the rows that agree throughout."""
    import torch
    from benchlib.check import same_path_diff

    base_t = torch.tensor([[9, 1, 2, 3], [9, 1, 2, 3]])  # a prompt of 1, then 3 steps
    base_l = torch.zeros(2, 3, 5)
    t = torch.tensor([[9, 1, 2, 3], [9, 1, 7, 3]])  # row 1 parts at step 1
    logits = base_l.clone()
    logits[0, 2, 0] = 0.01
    logits[1, 1, 0] = 0.5  # the step that picked the other token: compared
    logits[1, 2, 0] = 9.0  # after it: not
    assert same_path_diff(t, logits, base_t, base_l) == (0.5, 0.5)
    assert same_path_diff(base_t, base_l, base_t, base_l) == (0.0, 1.0)

"""What one bench run shares: its grids, shapes and limits, and the device, dtype and host-lane
costs that `bench.main` sets at the start (read them as `env.DEVICE` etc., never copied: main
rebinds them)."""
from __future__ import annotations

import datetime
import gc
import json
from pathlib import Path

import torch

MODES = ("gpu_resident", "full_offload", "kvpr", "pipelined")

GRIDS = {
    "smoke": [("tiny-opt", 2, 32), ("tiny-llama", 2, 32)],
    "quick": [("opt-1.3b", 8, 512)],
    "main": [("opt-6.7b", 32, 1024)],
    # the grid; the points most worth having first, in case a run is cut short
    "full": [("opt-6.7b", 32, 1024), ("llama-3-8b", 32, 2048), ("opt-13b", 32, 1024),
             ("opt-6.7b", 8, 512), ("llama-2-7b", 32, 2048), ("opt-6.7b", 8, 1024),
             ("opt-6.7b", 32, 1536), ("llama-2-7b", 32, 3584), ("opt-6.7b", 8, 1536),
             ("opt-6.7b", 32, 512)],
}
GEN_LEN = 32
# issue 6: FlexGen's throughput setting (weights, cache and activations all in CPU memory:
# --percent 0 100 0 100 0 100), prompt 256, gen 32, each mode at the batch and micro-batch
# count its policy search predicts fastest among those that fit. (model, gpu_mem_gb or None
# for the card's memory)
THROUGHPUT = {"throughput": [("opt-13b", None), ("opt-30b", None), ("opt-30b", 24.0)],
              "throughput-13b": [("opt-13b", None)],
              "throughput-30b": [("opt-30b", None), ("opt-30b", 24.0)],
              "throughput-30b-24gb": [("opt-30b", 24.0)],
              "throughput-smoke": [("tiny-opt", None)]}
TP_PROMPT = 256
TP_BATCHES = (16, 32, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)
TP_MICRO = (1, 2, 4, 8)
HOST_GB = 110.0  # of the machine's 128 GiB: room for the process, the model build and the OS
DEVICE = "cuda"  # --device cpu: a smoke test of this script on a machine without CUDA
# hardware overrides for every plan of the run: the host lane's per-node costs as
# kvc.profiler.host_us measures them on this machine at the start of the run (the host of a
# lent machine differs from lease to lease; the card's preset cannot know it)
HOST_OVERRIDES: list[str] = []
# schedule.cuda_graphs of the latency rows (--cuda-graphs): each value is its own row
GRAPHS: list[bool] = [True]
DTYPE, DTYPE_NAME = torch.float16, "float16"


def card_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def card_preset() -> str:
    if DEVICE != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name()
    return "h200-pcie5" if "H200" in name else "h100-pcie5"


def free_memory() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        empty_host = getattr(torch._C, "_host_emptyCache", None)
        if empty_host is not None:  # pinned pools are cached by torch: give them back
            empty_host()


def write_results(out, card: str, kind: str, text: str, data) -> Path:
    """A call's table and numbers: <out>/<date>-<card>-<kind>.md and .json; the stem."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{datetime.date.today().isoformat()}-{card.replace(' ', '-')}-{kind}"
    stem.with_suffix(".md").write_text(text if text.endswith("\n") else text + "\n")
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    return stem

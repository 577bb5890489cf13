"""`kvc bench`: compile, load and time decoding; --trace writes the measured and the
predicted decode step as Chrome traces."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from kvc.cli.run import check_device
from kvc.errors import KvcError


def cmd_bench(args) -> int:
    import tempfile

    import torch

    import kvc

    check_device(args.device)
    if args.trace:
        _trace_folder(Path(args.trace))  # before minutes of compiling and timing
    with tempfile.TemporaryDirectory() as tmp:
        path = kvc.compile(args.config, overrides=args.overrides, output=Path(tmp) / "a.kvc")
        model = kvc.load(path, device=args.device)
    w = model.manifest["config"]["workload"]
    ids = torch.randint(0, model.spec.vocab_size, (w["batch_size"], w["prompt_len"]))
    model.generate(ids, 2)  # warm-up
    t0 = time.perf_counter()
    model.generate(ids, w["gen_len"])
    dt = time.perf_counter() - t0
    print(f"kvc bench: mode={model.plan.mode} batch={w['batch_size']} prompt={w['prompt_len']} "
          f"gen={w['gen_len']}: {dt / w['gen_len'] * 1e3:.1f} ms/token (prefill included), "
          f"{w['batch_size'] * w['gen_len'] / dt:.1f} tokens/s")
    if args.trace:
        _trace_step(model, ids, Path(args.trace))
    return 0


def _trace_step(model, ids, folder: Path) -> None:
    """torch.profiler around exactly one decode step (the first after prefill, context
    prompt_len), and the cost model's prediction of that step, as two Chrome traces."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from kvc.hardware import HardwareConfig
    from kvc.reports.timeline import (
        predicted_intervals,
        write_atomically,
        write_chrome_trace,
    )

    _trace_folder(folder)
    cuda = model.device.type == "cuda"
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))

    def window(step, _tokens):
        if cuda:
            torch.cuda.synchronize(model.device)  # the step's kernels belong inside the window
        if step == 0:
            prof.start()
        elif step == 1:
            prof.stop()

    model.generate(ids, 2, on_token=window)
    measured = folder / "decode_step.json"
    write_atomically(measured, lambda tmp: prof.export_chrome_trace(str(tmp)))
    hw = HardwareConfig(**model.manifest["hardware"])
    predicted = write_chrome_trace(
        predicted_intervals(model.spec, hw, model.plan, ids.shape[1], ids.shape[0], model.plan.dtype),
        folder / "predicted.json", name=f"kvc predicted ({hw.name})")
    print(f"kvc bench: wrote {measured} (measured) and {predicted} (predicted for {hw.name}); "
          "open both in https://ui.perfetto.dev", file=sys.stderr)


def _trace_folder(folder: Path) -> None:
    """--trace DIR: a folder that exists or can be made, and that can be written."""
    if folder.exists() and not folder.is_dir():
        raise KvcError(f"--trace {folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KvcError(f"--trace {folder}: cannot make the folder ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise KvcError(f"--trace {folder}: cannot write into it")

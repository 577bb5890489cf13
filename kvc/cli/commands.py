"""`kvc compile`, `kvc plan`, `kvc profile`, `kvc inspect`: thin wrappers over the API and
the reports."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from kvc.errors import KvcError


def cmd_compile(args) -> int:
    import kvc

    t0 = time.perf_counter()
    out = kvc.compile(args.config, overrides=args.overrides, output=args.output)
    print(f"kvc: compiled {args.config} -> {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_plan(args) -> int:
    import json

    from kvc.api import resolve
    from kvc.reports.plan import plan_json, plan_text

    r = resolve(args.config, args.overrides)
    c = r.config
    if args.search is not None:
        from kvc.reports.plan import search_text

        print(search_text(r.spec, r.hardware, r.request, max_batch=args.search))
        return 0
    if args.json:
        print(json.dumps(plan_json(r.spec, r.hardware, r.request, args.context), indent=1))
    else:
        print(plan_text(r.spec, r.hardware, r.request, args.context))
    if args.timeline:
        from kvc.api import make_plan
        from kvc.reports.timeline import draw, predicted_intervals

        s = args.context or c.workload.prompt_len
        plan = make_plan(r)
        items = predicted_intervals(r.spec, r.hardware, plan, s, c.workload.batch_size, c.model.dtype)
        step = max(it["end"] for it in items)
        draw(items, args.timeline, num_layers=plan.num_units,
             title=f"{args.config}: {plan.mode} on {r.hardware.name}, batch {c.workload.batch_size}, "
                   f"{c.model.dtype}, context {s}: {step:.3f} ms per decode step (predicted)")
        print(f"kvc: wrote {args.timeline} (predicted timeline of the decode step at context {s})",
              file=sys.stderr)
    return 0


def cmd_profile(args) -> int:
    import torch

    from kvc.profiler.measure import profile
    from kvc.profiler.resolve import write_profile_yaml

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise KvcError("--device cuda: this machine has no CUDA device")
    from kvc.progress import is_enabled

    hw = profile(device, progress=is_enabled())
    if args.output:
        write_profile_yaml(hw, Path(args.output))
        print(f"kvc: wrote {args.output}")
    else:
        import dataclasses

        import yaml

        print(yaml.safe_dump(dataclasses.asdict(hw), sort_keys=False))
    return 0


def cmd_inspect(args) -> int:
    from kvc.reports.inspect import inspect_text

    print(inspect_text(args.artifact))
    return 0

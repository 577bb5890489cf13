"""Re-predict measured bench rows with the current cost model, on the CPU.

    python tools/repredict.py benchmarks/results/calls/A.json [B.json ...] [--out merged.json]

Each latency row of each results file (tools/bench.py) is planned again exactly as the bench
planned it (its preset, batch, context, mode and GPU budget, the card's hardware preset, the
host-lane costs that run measured) and predicted at the middle of the timed steps. Prints the
measured time against the prediction the run made and the current one. A row whose plan now
differs (another recompute split) measured a schedule the current code would not run: it is
flagged, and its error means little until it is measured again.

A row without `cuda_graphs` ran before the decode step had CUDA graphs (eager); each row is
planned with the setting it ran with, and eager and graphed rows are kept apart.

--out writes the rows, later files winning where the same (model, batch, context, mode,
cuda_graphs) appears twice, with `predicted_ms` the current prediction and `predicted_ms_at_run` the
run's own, and every input file's command, torch and host costs under `sources`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from benchlib import env
from benchlib.plan import get_spec, planned, point_budget_gb

from kvc.planner.scheduler import predict


def repredict(row: dict, hw_name: str, host: dict) -> tuple[float, float]:
    """(current predicted ms, the plan's recompute fraction at the prompt's context, as the
    bench reports it), planned as tools/bench.py plans the row."""
    name, b, ctx = row["model"], row["batch"], row["context"]
    spec = get_spec(name)
    env.HOST_OVERRIDES[:] = [f"hardware.{k}={v}" for k, v in host.items()]
    # gpu_resident ran with the card's memory (rounded in the row; it fits either way)
    budget = (row["gpu_mem_gb_budget"] if row["mode"] == "gpu_resident"
              else point_budget_gb(spec, name, hw_name, b, ctx))
    graphs = str(row.get("cuda_graphs", False)).lower()
    plan, r = planned(name, row["mode"], b, ctx, hw_name, budget, extra=(f"schedule.cuda_graphs={graphs}",))
    pred = predict(spec, r.hardware, plan, ctx + row["steps_timed"] // 2, b, env.DTYPE_NAME)
    frac = sum(plan.recompute_tokens(i, ctx) for i in range(spec.num_layers)) / (spec.num_layers * ctx)
    return pred["predicted_step_ms"], frac


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    merged, sources = {}, []
    print("| file | model | batch | context | mode | graphs | ms/token | LP at run | LP now | error now |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in args.results:
        d = json.loads(path.read_text())
        host = d.get("host_us_measured") or {}
        sources.append({k: d.get(k) for k in ("card", "date", "torch", "command", "host_us_measured")}
                       | {"file": path.name})
        for row in d["rows"]:
            key = (row["model"], row["batch"], row["context"], row["mode"], row.get("cuda_graphs", False))
            if row.get("setting") != "latency" or row["mode"] == "hf_offloaded":
                merged[key] = {**row, "source": path.name}
                continue
            now, frac = repredict(row, d.get("hardware_preset", "h200-pcie5"), host)
            old_frac = row.get("recompute_fraction_mid")
            moved = old_frac is not None and abs(frac - old_frac) > 0.01
            m = row["decode_ms_per_token"]
            print(f"| {path.name} | {row['model']} | {row['batch']} | {row['context']} | "
                  f"{row['mode']} | {'yes' if key[-1] else 'no'} | {m:.1f} | {row['predicted_ms']:.1f} | {now:.1f} | "
                  f"{(m / now - 1) * 100:+.0f}%{' (plan changed)' if moved else ''} |")
            merged[key] = {
                **row, "cuda_graphs": key[-1], "predicted_ms": round(now, 3), "predicted_ms_at_run": row["predicted_ms"],
                "plan_changed_since_run": moved, "source": path.name}
    if args.out:
        first = json.loads(args.results[0].read_text())
        out = {k: first.get(k) for k in ("card", "date", "torch", "hardware_preset")}
        out |= {"command": "python tools/repredict.py " + " ".join(str(p) for p in args.results),
                "sources": sources, "rows": list(merged.values())}
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

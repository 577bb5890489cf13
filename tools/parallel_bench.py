#!/usr/bin/env python
"""Several GPUs (issue 18) on one machine, in one call: decode ms/token of each point on 1, 2,
4 ... GPUs (one process per GPU through torchrun, the batch split by rows, or the context by tokens), the LP's
prediction for each, and whether the N-GPU tokens are the 1-GPU tokens.

    python tools/parallel_bench.py --out DIR                      # the issue's points, every GPU count
    python tools/parallel_bench.py --device cpu --gpus 1,2 --points tiny-opt:4:32 --long none   # smoke

Each GPU count runs in its own torchrun job (`python -m torch.distributed.run --standalone`):
per point, the model (dummy weights, seed 0) on every rank, the plan for one rank
(`parallel.world_size=N`: the rank's share of the batch, the per-rank link rate
hardware.host_link_gbps allows), timed as tools/benchlib times steps (a sync after the
prefill, the host running ahead between steps as in use), then 8 greedy tokens and the first
step's logits, which the N-GPU runs compare with the 1-GPU run's. `--long`: a batch of one
long context, which a row split cannot divide: on several GPUs it runs as a token split (each
rank attends to its share of every offloaded layer's context; `--split tokens` makes every
point one).
Writes <date>-<card>-parallel.{md,json} to --out; every row carries "gpus".
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

POINTS = "opt-6.7b:32:1024,llama-3-8b:32:2048,llama-2-7b:32:3584"
LONG = "llama-3.1-8b:1:65536"
CHECK_TOKENS = 8


def child(args) -> int:
    """One torchrun job: every point at this world size; rank 0 writes the rows."""
    from benchlib import env
    from benchlib.plan import get_spec, planned, point_budget_gb
    from benchlib.timing import compiled_decode_ms

    from kvc.api import assemble
    from kvc.compiler.lowering import lower
    from kvc.models import build_model
    from kvc.runtime.parallel import join

    env.DEVICE = args.device
    if args.device == "cpu":
        env.DTYPE, env.DTYPE_NAME = torch.float32, "float32"
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("WORLD_SIZE", "1"))))
    ranks, device = join(torch.device("cuda" if args.device == "cuda" else "cpu"))
    hw_name = env.card_preset()
    work = Path(args.work)
    rows = []
    for point in [p for p in args.points.split(",") if p]:
        name, batch, context = point.split(":")
        batch, context = int(batch), int(context)
        row = {"model": name, "batch": batch, "context": context, "mode": args.mode,
               "gpus": ranks.world, "card": env.card_name(), "device": args.device}
        # a row split where the batch divides, else (or with --split tokens) a token split
        split = "tokens" if ranks.world > 1 and (args.split == "tokens" or batch < ranks.world) else "rows"
        row["split"] = split
        spec = get_spec(name)
        if split == "rows":
            budget = point_budget_gb(spec, name, hw_name, ranks.share(batch), context)
        else:  # every row, a share of the context: staging for the share
            budget = point_budget_gb(spec, name, hw_name, batch, ranks.share(context))
        plan, r = planned(name, args.mode, batch, context, hw_name, budget,
                          extra=(f"parallel.world_size={ranks.world}", f"parallel.split={split}"))
        ranks = replace(ranks, split=split)
        model = build_model(spec, device, env.DTYPE, seed=0)
        cm = assemble(lower(model, plan), plan, spec, env.DTYPE, device, ranks=ranks)
        ids = torch.randint(0, spec.vocab_size, (batch, context),
                            generator=torch.Generator().manual_seed(0)).to(device)
        ms = compiled_decode_ms(cm, ids, args.steps, args.repeats)
        tokens, logits = cm.generate(ids, CHECK_TOKENS, return_logits=True)
        mine = {"tokens": tokens[:, context:].cpu(), "logits0": logits[:, 0].cpu()}
        key = f"{name}-{batch}-{context}"
        if ranks.world == 1:
            torch.save(mine, work / f"{key}.pt")
        elif (work / f"{key}.pt").exists():
            one = torch.load(work / f"{key}.pt")
            row["tokens_equal_1gpu"] = bool(torch.equal(one["tokens"], mine["tokens"]))
            row["tokens_same_frac"] = round((one["tokens"] == mine["tokens"]).float().mean().item(), 4)
            row["step0_max_logit_diff"] = round((one["logits0"] - mine["logits0"]).abs().max().item(), 5)
        pred = plan.predicted_step_ms[:args.steps]
        row.update({"ms": round(ms, 2), "lp_ms": round(statistics.mean(pred), 2),
                    "rank_batch": plan.batch_size,
                    "h2d_gbps_per_rank": plan.notes.get("parallel", {}).get("h2d_gbps", r.hardware.h2d_gbps),
                    "gpu_mem_gb": budget, "notes": {k: v for k, v in plan.notes.items()
                                                   if k in ("gather_ms", "world_size", "max_context")}})
        rows.append(row)
        if ranks.rank == 0:
            print(f"row {row}", flush=True)
        cm.close()
        del cm, model
        env.free_memory()
    if ranks.rank == 0:
        Path(args.rows).write_text(json.dumps(rows))
    return 0


def table(rows) -> str:
    one = {(r["model"], r["batch"], r["context"]): r.get("ms") for r in rows if r["gpus"] == 1}
    lines = ["| model | batch | context | GPUs | split | rank batch | link GB/s per rank | ms/token | vs 1 GPU | LP ms | LP error | tokens = 1 GPU | step-0 logit diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r['gpus']} | - | - | - | - | - | - | - | - | {r.get('note', '')} |")
            continue
        base = one.get((r["model"], r["batch"], r["context"]))
        ratio = f"{r['ms'] / base:.3f}x" if base else "-"
        err = f"{(r['lp_ms'] - r['ms']) / r['ms'] * 100:+.1f}%"
        same = "-" if r["gpus"] == 1 else f"{r.get('tokens_equal_1gpu')} ({r.get('tokens_same_frac')})"
        lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r['gpus']} | {r.get('split', 'rows')} | {r['rank_batch']} | "
                     f"{r['h2d_gbps_per_rank']} | {r['ms']} | {ratio} | {r['lp_ms']} | {err} | {same} | "
                     f"{r.get('step0_max_logit_diff', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default=POINTS)
    ap.add_argument("--long", default=LONG, help="a long batch-1 point (none: skip it)")
    ap.add_argument("--gpus", default=None, help="GPU counts, e.g. 1,2,4 (default: 1, 2, 4 up to the machine's)")
    ap.add_argument("--mode", default="pipelined")
    ap.add_argument("--split", choices=["rows", "tokens"], default="rows",
                    help="how N GPUs share a point whose batch divides (a smaller one: tokens)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    have = torch.cuda.device_count() if args.device == "cuda" else 8
    counts = [int(g) for g in args.gpus.split(",")] if args.gpus else [g for g in (1, 2, 4) if g <= have]
    points = args.points + ("" if args.long in (None, "", "none") else "," + args.long)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for n in counts:
            out = Path(work) / f"rows-{n}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                   __file__, "--child", "--points", points, "--mode", args.mode, "--device", args.device,
                   "--split", args.split,
                   "--steps", str(args.steps), "--repeats", str(args.repeats), "--rows", str(out),
                   "--work", work]
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // n)))}
            print(f"== {n} GPU(s): {' '.join(cmd)}", flush=True)
            rc = subprocess.call(cmd, env=env)
            if rc or not out.exists():
                print(f"== {n} GPU(s) failed (exit {rc})", flush=True)
                rows.append({"model": "*", "batch": 0, "context": 0, "gpus": n, "note": f"failed, exit {rc}"})
                continue
            rows += json.loads(out.read_text())
    card = rows[0].get("card", "cpu") if rows else "cpu"
    text = f"# Several GPUs, {card}, {datetime.date.today()}\n\n" + table(rows)
    print(text)
    if args.out:
        from benchlib.env import write_results

        write_results(args.out, card, "parallel", text, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""A mixed-length JSONL job through one artifact, next to the same job padded to one length
(issue 15: "256 prompts, lengths 64..1024, 64 new tokens: prompts/s and decode tokens/s").

    # the issue's row, on the H200 (OPT-6.7B, batch 32, dummy fp16 weights, pipelined)
    python tools/job_bench.py --out benchmarks/results
    # a smoke test anywhere
    python tools/job_bench.py --preset tiny-opt --batch 4 --prompts 12 --min-len 4 --max-len 40 \\
        --new 4 --device cpu --out /tmp/jb

It compiles the preset with dummy weights for the card's hardware preset at the offloading
GPU budget of tools/soak.py's budget_gb (weights, staging and workspace fit, no layer's KV
cache does), `workload.max_context` = max_len + new so every prompt length is served (where
this kvc has no max_context, a fixed `schedule.recompute_fraction`, which covers any length),
loads it with `kvc.load`, and runs two jobs through kvc.jobs.run_job (the code of
`kvc run --input`), each after one warm-up batch of its own shape:

  mixed:  N prompts of random token ids, lengths uniform in [min_len, max_len] (seeded);
  padded: the same prompts, each left-filled with token id 1 up to max_len.

Every row generates exactly `new` tokens (no EOS). Reported per job: wall time, prompts/s,
decode tokens/s (new tokens / wall time, prefill included), the prompt tokens the batches
carried (padding included) against the real ones. Writes <date>-<card>-jobs.{md,json}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def make_job(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def carried_tokens(lengths: list[int], batch: int) -> int:
    """Prompt tokens the job's batches hold, padding included (kvc.text's packing)."""
    from kvc.text import batches

    return sum(batch * max(lengths[i] for i in idx) for idx in batches(lengths, batch))


def run_one(model, name: str, prompts: list[list[int]], new: int, folder: Path) -> dict:
    from kvc.jobs import run_job

    def write(path, ps):
        path.write_text("".join(json.dumps({"prompt_ids": p, "max_new_tokens": new}) + "\n" for p in ps))
        return str(path)

    b = model.plan.batch_size
    # the shortest batch: pools sized for the shortest context serve every longer one
    warm = write(folder / f"{name}-warm.jsonl", sorted(prompts, key=len)[:b])
    run_job(model, warm, str(folder / f"{name}-warm.out.jsonl"), eos_token_id=())
    sync(model)
    s = run_job(model, write(folder / f"{name}.jsonl", prompts), str(folder / f"{name}.out.jsonl"),
                eos_token_id=())
    sync(model)
    out = [json.loads(x) for x in (folder / f"{name}.out.jsonl").read_text().splitlines()]
    assert len(out) == len(prompts) and all(r["completion_tokens"] == new for r in out), name
    lengths = [len(p) for p in prompts]
    return {"job": name, "prompts": s.prompts, "new_tokens": s.tokens, "seconds": round(s.seconds, 3),
            "prompts_per_s": round(s.prompts / s.seconds, 3),
            "decode_tokens_per_s": round(s.tokens / s.seconds, 1),
            "prompt_tokens": sum(lengths), "carried_prompt_tokens": carried_tokens(lengths, b)}


def sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def compile_artifact(args, device: str, folder: Path):
    import kvc
    from kvc.config.schema import WorkloadConfig

    hardware = args.hardware or ("h200-pcie5" if device == "cuda" else "cpu")
    dtype = args.dtype or ("float16" if device == "cuda" else "float32")
    workload = {"batch_size": args.batch, "prompt_len": args.max_len, "gen_len": args.new}
    overrides = list(args.override)
    if "max_context" in WorkloadConfig.__dataclass_fields__:
        workload["max_context"] = args.max_len + args.new
    else:  # this kvc plans prompt_len..prompt_len+gen_len only: a fixed split covers any length
        overrides.append("schedule.recompute_fraction=0.5")
    if device == "cuda":
        sys.path.insert(0, str(ROOT / "tools"))
        from soak import budget_gb

        overrides.append("hardware.gpu_mem_gb="
                         f"{args.gpu_mem_gb or budget_gb(args.preset, hardware, dtype, args.batch, args.max_len + args.new)}")
    config = {"model": {"preset": args.preset, "dtype": dtype}, "hardware": hardware,
              "workload": workload, "schedule": {"mode": args.mode}}
    t = time.perf_counter()
    path = kvc.compile(config, overrides, output=folder / "job.kvc")
    return path, config, overrides, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="opt-6.7b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--new", type=int, default=64, help="new tokens per prompt (every row makes them)")
    ap.add_argument("--mode", default="pipelined")
    ap.add_argument("--device", default=None, help="default: cuda if present")
    ap.add_argument("--hardware", default=None, help="default: h200-pcie5 on CUDA, cpu on a CPU")
    ap.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on a CPU")
    ap.add_argument("--gpu-mem-gb", type=float, default=None, help="default: tools/soak.py's budget_gb")
    ap.add_argument("--override", action="append", default=[], help="more Hydra overrides")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for <date>-<card>-jobs.md/.json")
    args = ap.parse_args(argv)
    if not 1 <= args.min_len <= args.max_len:
        ap.error("expected 1 <= --min-len <= --max-len")
    import kvc

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path, config, overrides, compile_s = compile_artifact(args, device, folder)
        model = kvc.load(path, device=device)
        print(f"job_bench: {args.preset} b{args.batch} {args.mode} on {card}: max_context "
              f"{model.max_context}, compiled in {compile_s:.1f} s", flush=True)
        prompts = make_job(args.prompts, args.min_len, args.max_len, model.spec.vocab_size, args.seed)
        padded = [[1] * (args.max_len - len(p)) + p for p in prompts]
        rows = [run_one(model, "mixed", prompts, args.new, folder),
                run_one(model, "padded", padded, args.new, folder)]
        model.close()
    lines = [(f"# JSONL job: {args.prompts} prompts of {args.min_len}..{args.max_len} tokens, "
             f"{args.new} new each"), "",
             (f"{args.preset}, batch {args.batch}, {args.mode}, {config['model']['dtype']}, {card}, "
             f"overrides {' '.join(overrides) or '-'}"), "",
             "| job | prompts | new tokens | s | prompts/s | decode tokens/s | prompt tokens (carried) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['job']} | {r['prompts']} | {r['new_tokens']} | {r['seconds']:.2f} | "
                     f"{r['prompts_per_s']:.2f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['prompt_tokens']} ({r['carried_prompt_tokens']}) |")
    speedup = rows[1]["seconds"] / rows[0]["seconds"]
    lines += ["", f"mixed vs padded to {args.max_len}: x{speedup:.2f} prompts/s"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{datetime.date.today().isoformat()}-{card.replace(' ', '-')}-jobs"
        (out / f"{stem}.md").write_text(text + "\n")
        (out / f"{stem}.json").write_text(json.dumps(
            {"config": config, "overrides": overrides, "args": vars(args), "card": card,
             "kvc": kvc.__version__, "torch": torch.__version__, "rows": rows,
             "mixed_vs_padded": round(speedup, 3)}, indent=1) + "\n")
        print(f"job_bench: wrote {out / stem}.md/.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Plot a bench results JSON: decode ms/token per mode and grid point, LP prediction as ticks.

    python tools/plot_bench.py benchmarks/results/2026-11-28-NVIDIA-H200.json docs/bench-h200.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

MODES = ("gpu_resident", "full_offload", "kvpr", "pipelined", "hf_offloaded")
COLORS = {"gpu_resident": "#999999", "full_offload": "#d62728", "kvpr": "#ff7f0e",
          "pipelined": "#2ca02c", "hf_offloaded": "#7f7f7f"}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("setting", "latency") == "latency"]
    points = list(dict.fromkeys((r["model"], r["batch"], r["context"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(points)), 4.5))
    width = 0.8 / len(MODES)
    for k, mode in enumerate(MODES):
        xs, ys, preds = [], [], []
        for i, p in enumerate(points):
            same = [r for r in rows if (r["model"], r["batch"], r["context"]) == p and r["mode"] == mode]
            # a row with CUDA graphs (the default) where a call measured both
            r = next((r for r in same if r.get("cuda_graphs")), same[0] if same else None)
            if r is None:
                continue
            xs.append(i + (k - len(MODES) / 2 + 0.5) * width)
            ys.append(r["decode_ms_per_token"])
            preds.append(r.get("predicted_ms"))
        if not xs:
            continue
        ax.bar(xs, ys, width, label=mode, color=COLORS[mode])
        px = [x for x, p in zip(xs, preds) if p is not None]
        py = [p for p in preds if p is not None]
        ax.scatter(px, py, marker="_", s=120, color="black", zorder=3,
                   label="LP prediction" if mode == "pipelined" else None)
    ax.set_xticks(range(len(points)))
    ax.set_xticklabels([f"{m}\nb={b} s={s}" for m, b, s in points], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("decode ms / token (log)")
    ax.set_title(f"kvc decode step, {result['card']}, {result['date']} (fp16, KV cache offloaded)")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    plot(json.loads(src.read_text()), dst)
    print(f"wrote {dst}")

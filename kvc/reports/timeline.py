"""The predicted timeline of one decode step, as a picture (`kvc plan --timeline plan.png`)
or as Chrome trace JSON (`kvc bench --trace DIR`, next to the measured trace).

The intervals come from kvc.planner.cost (`layer_costs`, `durations`, `intervals`): the same numbers
and the same earliest-start rules the scheduler's prediction uses, so the picture shows the
schedule the LP believed in, not a re-derivation of it. matplotlib is optional
(`pip install 'kvc[plot]'`); only drawing needs it.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path

import numpy as np

from kvc.errors import KvcError
from kvc.hardware import HardwareConfig
from kvc.ir.plan import Plan
from kvc.models.spec import ModelSpec
from kvc.planner import cost
from kvc.planner.evaluate import cpu_table, gather_ms, rank_view
from kvc.planner.scheduler import step_terms

LANES = ("copy-in", "compute", "copy-out", "cpu")  # cpu: the CPU attention lane (issue 17)
COLORS = {"act_copy": "#4c9be8", "kv_copy": "#f28e2b", "recompute": "#59a14f",
          "compute": "#9c6ade", "writeback": "#e15759", "cpu_attn": "#edc948", "head": "#7f7f7f",
          "gather": "#bab0ac", "merge": "#ff9da7", "broadcast": "#bab0ac"}
LABELS = {"act_copy": "activation copy (H2D)", "kv_copy": "KV copy (H2D)",
          "recompute": "K/V recompute", "compute": "attention + MLP",
          "writeback": "write-back (D2H)", "weight_copy": "weight copy (H2D)",
          "cpu_attn": "attention on the CPU (oldest tokens)", "head": "final norm + LM head",
          "gather": "logits all-gather (several GPUs)",
          "merge": "all-gather + merge of the ranks' partials (token split)",
          "broadcast": "token broadcast (token split)"}


def predicted_intervals(spec: ModelSpec, hw: HardwareConfig, plan: Plan, s: int,
                        batch_size: int, dtype: str) -> list[dict]:
    """Per-stream busy intervals (ms) of the decode step at context s under `plan` (per unit:
    with micro-batches, "layer" u is layer u // m on micro-batch u % m). Several GPUs: one
    rank's step (`hw` the host's, `batch_size` the rank's or the whole batch), then the
    logits all-gather on the compute lane after the last interval. A token split: s is the
    whole context, the step a rank's at its share (the merges in the walk), then the token
    broadcast."""
    hw, batch_size = rank_view(hw, plan, batch_size)
    s = plan.share_context(s)
    try:
        l = np.array([plan.recompute_tokens(u, s) for u in range(plan.num_units)])
    except ValueError as e:
        raise KvcError(str(e)) from None
    cpu = cpu_table(spec, plan, np.array([s]))[:, 0] if plan.cpu_lane else None
    args, kw = step_terms(spec, hw, plan, s, l, batch_size, dtype, cpu)
    items = cost.intervals(*args, **kw)
    if plan.world_size > 1:
        end = max((it["end"] for it in items), default=0.0)
        items.append({"lane": "compute", "kind": "broadcast" if plan.context_shares > 1 else "gather",
                      "layer": None, "start": end,
                      "end": end + gather_ms(spec, hw, plan.world_size, batch_size, dtype, plan.split)})
    return items


def lanes_of(items: list[dict]) -> tuple[str, ...]:
    """The lanes drawn: the CPU's only where the step uses it."""
    return tuple(lane for lane in LANES if lane != "cpu" or any(it["lane"] == "cpu" for it in items))


def chrome_trace(items: list[dict], name: str = "kvc predicted") -> dict:
    """Intervals as Chrome trace events (one thread per stream lane, microseconds), so the
    prediction opens in Perfetto / chrome://tracing beside torch.profiler's measured trace."""
    events = [{"ph": "M", "name": "process_name", "pid": 0, "args": {"name": name}}]
    lanes = lanes_of(items)
    for tid, lane in enumerate(lanes):
        events.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": tid, "args": {"name": lane}})
    for it in items:
        layer = "head" if it["layer"] is None else f"L{it['layer']}"
        events.append({"ph": "X", "pid": 0, "tid": lanes.index(it["lane"]),
                       "name": f"{layer} {LABELS[it['kind']]}", "cat": it["kind"],
                       "ts": it["start"] * 1e3, "dur": (it["end"] - it["start"]) * 1e3})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(items: list[dict], path, name: str = "kvc predicted") -> Path:
    """Written whole or not at all: a temporary file beside it, renamed over it."""
    path = Path(path)
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(chrome_trace(items, name))))
    return path


def write_atomically(path: Path, write) -> None:
    """`write(tmp)` into a temporary name beside `path`, then renamed to it; the temporary is
    removed whatever happens (a full disk, Ctrl-C), and an OSError is one KvcError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise KvcError(f"{path}: cannot write it ({e.strerror or e})") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise KvcError("--timeline needs matplotlib, which is not installed; "
                       "pip install 'kvc[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def draw(items: list[dict], path, title: str = "", num_layers: int | None = None) -> Path:
    """One row per layer, split into three lanes (copy-in, compute, copy-out; a fourth, cpu,
    when the plan attends on the CPU), bars colored by kind; the head gets a row of its own
    below the last layer."""
    plt = _pyplot()
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf", ".jpg", ".jpeg"):
        raise KvcError(f"--timeline {path}: expected a .png, .svg, .pdf or .jpg file name")
    layers = num_layers if num_layers is not None else 1 + max(
        (it["layer"] for it in items if it["layer"] is not None), default=-1)
    rows = layers + 1  # + the head
    lanes = lanes_of(items)
    lane_h = 1.0 / len(lanes)
    fig, ax = plt.subplots(figsize=(13, max(3.0, 0.45 * rows + 1.5)))
    for it in items:
        row = layers if it["layer"] is None else it["layer"]
        y = row + lanes.index(it["lane"]) * lane_h
        ax.broken_barh([(it["start"], it["end"] - it["start"])], (y + 0.04, lane_h - 0.08),
                       facecolors=COLORS[it["kind"]], edgecolor="none")
    ax.set_ylim(rows, 0)  # layer 0 on top: time runs left to right, layers top to bottom
    names = [f"layer {r}" for r in range(layers)] + ["head"]
    if rows <= 8:  # few rows: name every lane; many: the subtitle says the order
        ax.set_yticks([r + (k + 0.5) * lane_h for r in range(rows) for k in range(len(lanes))])
        ax.set_yticklabels([f"{n} {lane}" for n in names for lane in lanes], fontsize=7)
    else:
        ax.set_yticks([r + 0.5 for r in range(rows)])
        ax.set_yticklabels(names)
    for r in range(1, rows):
        ax.axhline(r, color="#dddddd", linewidth=0.5)
    ax.set_xlabel("ms from the start of the decode step (predicted)")
    kinds = [k for k in COLORS if any(it["kind"] == k for it in items)]
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=COLORS[k]) for k in kinds],
              labels=[LABELS[k] for k in kinds], loc="upper left", bbox_to_anchor=(1.01, 1.0),
              fontsize=8, frameon=False)
    ax.set_title(title + "\nlanes per layer, top to bottom: " + ", ".join(lanes), fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise KvcError(f"--timeline {path}: cannot write it ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    return path

"""Reading an artifact: manifest.json and graph.py, and every manifest field's type and
bounds (kvc.config.LIMITS) checked before anything is built from it."""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

from kvc.artifact.checkpoint import _check_weights_entry, _int
from kvc.artifact.folder import (
    _HEX64,
    FORMAT,
    FORMAT_VERSION,
    GRAPH,
    MANIFEST,
    MAX_GRAPH_BYTES,
    MAX_MANIFEST_BYTES,
    _read_member,
)
from kvc.config import LIMITS, from_dict, hardware_from_dict
from kvc.errors import KvcError
from kvc.ir.modes import NAMES as MODE_NAMES
from kvc.ir.plan import Plan
from kvc.ir.request import SPLITS


def read_manifest(path) -> dict:
    """The manifest of the artifact folder `path`, every field checked (validate_manifest),
    after graph.py's bytes matched its recorded hash."""
    path = Path(path)
    mf = path / MANIFEST
    try:
        if not path.is_dir():
            raise FileNotFoundError(path)
        raw = _read_member(path, MANIFEST, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise KvcError(f"{path}: not a kvc artifact (expected a folder with {MANIFEST})") from None
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as e:
        why = str(e) if isinstance(e, ValueError) else "nested too deeply"
        raise KvcError(f"{mf}: damaged manifest ({why}); recompile the artifact") from None
    validate_manifest(manifest, str(mf))
    graph = path / GRAPH
    try:
        text = _read_member(path, GRAPH, MAX_GRAPH_BYTES)
    except FileNotFoundError:
        text = None
    if text is None or hashlib.sha256(text).hexdigest() != manifest["graph_sha256"]:
        raise KvcError(f"{graph}: missing or edited (its hash differs from the manifest's); "
                       "recompile the artifact")
    return manifest


def validate_manifest(m, where: str = MANIFEST) -> dict:
    """KvcError unless every field the loader and `kvc inspect` read has its type and bounds:
    a crafted manifest is refused here, before anything is sized or solved from it."""
    def need(ok, what: str):
        if not ok:
            raise KvcError(f"{where}: damaged manifest ({what}); recompile the artifact")

    need(isinstance(m, dict), "not a JSON object")
    if "format" in m and m["format"] != FORMAT:
        raise KvcError(f"{where}: not a kvc artifact (format {str(m['format'])[:40]!r}, expected "
                       f"{FORMAT!r})")
    version = m.get("format_version")
    if version != FORMAT_VERSION or type(version) is not int:
        raise KvcError(f"{where}: artifact format version {str(version)[:40]}, this kvc reads "
                       f"version {FORMAT_VERSION}; recompile it with this kvc")
    for key in ("config", "plan", "code_hash", "graph_sha256", "weights", "model_spec", "hardware"):
        need(key in m, f"no {key!r}")
    for key in ("kvc_version", "torch_version", "created"):
        need(key not in m or isinstance(m[key], str), f"{key} is not a string")
    need(isinstance(m["code_hash"], str) and re.fullmatch(r"[0-9a-f]{16,128}", m["code_hash"]),
         "code_hash is not a hex digest")
    need(isinstance(m["graph_sha256"], str) and _HEX64.fullmatch(m["graph_sha256"]),
         "graph_sha256 is not a sha256 hex digest")
    for key in ("config", "model_spec", "hardware", "plan", "weights"):
        need(isinstance(m[key], dict), f"{key} is not an object")
    cfg = from_dict(m["config"], where=where)  # typed and held to kvc.config's ranges
    hardware_from_dict(m["hardware"], where)
    spec = _check_spec(m["model_spec"], need)
    _check_plan(m["plan"], spec, cfg, need)
    _check_weights_entry(m["weights"], where)
    need((m["weights"]["kind"] == "dummy") == (cfg.model.checkpoint is None),
         "weights.kind disagrees with the config's model.checkpoint")
    return m


def _num(v, lo: float, hi: float) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi


def _check_spec(d: dict, need):
    from kvc.models.spec import ModelSpec

    bounds = {"num_layers": (1, LIMITS["num_layers"]), "vocab_size": (1, LIMITS["vocab_size"]),
              "max_positions": (1, LIMITS["max_positions"]),
              "hidden_size": (1, LIMITS["width"]), "intermediate_size": (1, LIMITS["width"]),
              "head_dim": (0, LIMITS["width"]), "word_embed_proj_dim": (0, LIMITS["width"]),
              "num_heads": (1, LIMITS["heads"]), "num_kv_heads": (1, LIMITS["heads"])}
    for key, (lo, hi) in bounds.items():
        if key in d or key not in ("head_dim", "word_embed_proj_dim"):
            need(_int(d.get(key), lo, hi), f"model_spec.{key} = {str(d.get(key))[:40]}; expected an "
                                           f"integer {lo}..{hi}")
    for key in ("model_type", "family", "activation"):
        need(key not in d or isinstance(d[key], str), f"model_spec.{key} is not a string")
    w = d.get("window_layers", [])
    need(isinstance(w, list) and all(_int(i, 0, d["num_layers"] - 1) for i in w),
         "model_spec.window_layers is not a list of layer numbers")
    sw = d.get("sliding_window")
    need(sw is None or _int(sw, 1, LIMITS["max_positions"]), "model_spec.sliding_window out of range")
    for key in ("options", "extra"):
        need(isinstance(d.get(key, {}), dict), f"model_spec.{key} is not an object")
    need(d.get("rope_scaling") is None or isinstance(d["rope_scaling"], dict),
         "model_spec.rope_scaling is not an object")
    try:
        spec = ModelSpec.from_dict(d)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        need(False, f"model_spec: {e}")
    need(1 <= spec.head_dim <= LIMITS["width"] and spec.num_heads % spec.num_kv_heads == 0,
         "model_spec: heads and head_dim do not fit together")
    return spec


def _check_plan(d: dict, spec, cfg, need) -> None:
    ctx = LIMITS["context"]
    need(d.get("mode") in MODE_NAMES, f"plan.mode {str(d.get('mode'))[:40]!r} is not a mode")
    need(d.get("num_layers") == spec.num_layers, "plan.num_layers differs from model_spec.num_layers")
    m = d.get("micro_batches", 1)
    need(_int(m, 1, LIMITS["num_gpu_batches"]), "plan.micro_batches out of range")
    units = spec.num_layers * m
    n = d.get("world_size", 1)  # absent: a one-GPU plan (and every plan made before issue 18)
    need(_int(n, 1, LIMITS["world_size"]),
         f"plan.world_size = {str(n)[:40]}; expected an integer 1..{LIMITS['world_size']}")
    need(n == cfg.parallel.world_size, "plan.world_size differs from the config's parallel.world_size")
    split = d.get("split", "rows")  # absent: a row split or one GPU (every plan before tokens)
    need(split in SPLITS, f"plan.split = {str(split)[:40]!r}; expected one of {list(SPLITS)}")
    need(split == (cfg.parallel.split if n > 1 else "rows"),
         "plan.split differs from the config's parallel.split")
    shares = n if split == "tokens" else 1  # a token split's plan is a rank's share of contexts
    for key, lo, hi in (("prompt_len", 1, ctx), ("gen_len", 0, ctx), ("chunk_tokens", 1, LIMITS["chunk_tokens"]),
                        ("lookahead", 0, 8), ("act_chunks", 1, LIMITS["act_chunks"]),
                        ("batch_size", 0, LIMITS["batch_size"])):
        if key in d or key in ("prompt_len", "gen_len", "chunk_tokens"):
            need(_int(d.get(key), lo, hi), f"plan.{key} = {str(d.get(key))[:40]}; expected an integer {lo}..{hi}")
    p, g = d["prompt_len"], d["gen_len"]
    need(p + g <= ctx, "plan: prompt_len + gen_len out of range")
    P, G = cfg.workload.prompt_len, cfg.workload.gen_len
    first, end = -(-P // shares), -(-(P + G) // shares)
    need(p == first and g == end - first,
         "plan's prompt_len/gen_len differ from the config's workload"
         + (" (a rank's share of it)" if shares > 1 else ""))
    r = d.get("resident")
    need(isinstance(r, list) and len(r) == units and all(type(x) is bool for x in r),
         f"plan.resident is not {units} true/false flags")
    mc = d.get("max_context", p + g)  # absent: a plan made before issue 15 (prompt_len + gen_len)
    need(_int(mc, p + g, ctx), f"plan.max_context = {str(mc)[:40]}; expected an integer {p + g}..{ctx}")
    want = cfg.workload.max_context
    need(mc <= spec.max_positions or "max_context" not in d,
         f"plan.max_context = {mc} exceeds model_spec.max_positions ({spec.max_positions})")
    need(want is None or mc == (want if shares == 1 else -(-want // shares) + 1),
         "plan.max_context differs from the config's workload.max_context"
         + (" (a rank's share of it)" if shares > 1 else ""))
    f = d.get("forced_fraction")
    need(f is None or _num(f, 0.0, 1.0), "plan.forced_fraction is not null or 0..1")
    if "recompute_runs" in d:  # issue 15: runs [first context, l per unit] covering ..max_context
        runs = d["recompute_runs"]
        need("recompute" not in d, "plan has both recompute and recompute_runs")
        need(isinstance(runs, list) and len(runs) <= mc, "plan.recompute_runs has more runs than contexts")
        last = -1
        for run in runs:
            need(isinstance(run, list) and len(run) == 2 and _int(run[0], last + 1, mc),
                 f"plan.recompute_runs entries must be [first context, row], the contexts "
                 f"increasing within 0..{mc}")
            need(isinstance(run[1], list) and len(run[1]) == units
                 and all(_int(x, 0, mc) for x in run[1]),
                 f"plan.recompute_runs rows must hold {units} token counts 0..{mc}")
            last = run[0]
        need(f is not None or all(r) or (runs and runs[0][0] <= p),
             f"plan.recompute_runs start after the workload's prompt_len {p}")
    else:
        rows = d.get("recompute", [])
        need(isinstance(rows, list) and len(rows) <= g + 1, "plan.recompute has more rows than contexts")
        for row in rows:
            need(isinstance(row, list) and len(row) == units and all(_int(x, 0, p + g) for x in row),
                 f"plan.recompute rows must hold {units} token counts 0..{p + g}")
        need(f is not None or all(r) or len(rows) == g + 1,
             f"plan.recompute has {len(rows)} rows; its contexts {p}..{p + g} need {g + 1}")
        need(f is not None or mc == p + g, "plan.max_context differs from its recompute rows' contexts")
    _check_cpu_lane(d, units, mc, need)
    ms = d.get("predicted_step_ms", [])
    need(isinstance(ms, list) and len(ms) <= g + 1 and all(_num(x, 0, 1e12) for x in ms),
         "plan.predicted_step_ms is not a list of times")
    ws = d.get("weights_streamed", [])
    need(isinstance(ws, list) and len(ws) in (0, spec.num_layers) and all(_num(x, 0, 1) for x in ws),
         "plan.weights_streamed is not one fraction per layer")
    need(isinstance(d.get("notes", {}), dict), "plan.notes is not an object")
    need(isinstance(d.get("dtype", ""), str), "plan.dtype is not a string")
    need(type(d.get("cuda_graphs", False)) is bool, "plan.cuda_graphs is not true/false")
    try:
        Plan.from_json(d)
    except (TypeError, ValueError, KeyError) as e:
        need(False, f"plan: {e}")


def _check_cpu_lane(d: dict, units: int, mc: int, need) -> None:
    """The CPU attention lane (issue 17): `cpu`, one row of CPU tokens per unit for each run
    of the table (the runs of recompute_runs; the _check_plan above checked their shape),
    c + l at most the run's first context; `bare`, l without the lane, likewise per run, at
    most its first context and only with `cpu`; `cpu_fraction` null
    or 0..1 (with a forced recompute fraction, their sum at most 1); `cpu_threads`; `cpu_gbps`,
    the rate the LP planned it with."""
    f = d.get("cpu_fraction")
    need(f is None or _num(f, 0.0, 1.0), "plan.cpu_fraction is not null or 0..1")
    lf = d.get("forced_fraction")
    need(f is None or lf is None or f + lf <= 1.0,
         "plan.cpu_fraction + plan.forced_fraction exceed 1")
    need(_int(d.get("cpu_threads", 0), 0, LIMITS["cpu_threads"]),
         f"plan.cpu_threads = {str(d.get('cpu_threads'))[:40]}; expected an integer "
         f"0..{LIMITS['cpu_threads']}")
    need(_num(d.get("cpu_gbps", 0.0), 0.0, 1e6),
         f"plan.cpu_gbps = {str(d.get('cpu_gbps'))[:40]}; expected a number 0..1e6")
    need("bare" not in d or "cpu" in d, "plan.bare without plan.cpu rows")
    if "cpu" not in d:
        return
    rows, runs = d["cpu"], d.get("recompute_runs")
    need(isinstance(runs, list) and isinstance(rows, list) and len(rows) == len(runs),
         "plan.cpu must hold one row per run of plan.recompute_runs")
    need(f is None, "plan has both cpu rows and a cpu_fraction")
    for row, run in zip(rows, runs):
        need(isinstance(row, list) and len(row) == units and all(_int(x, 0, mc) for x in row),
             f"plan.cpu rows must hold {units} token counts 0..{mc}")
        need(all(c + l <= run[0] for c, l in zip(row, run[1])),
             "plan.cpu: a unit's CPU and recomputed tokens exceed its run's first context")
    if "bare" in d:
        bare = d["bare"]
        need(isinstance(bare, list) and len(bare) == len(runs),
             "plan.bare must hold one row per run of plan.recompute_runs")
        for row, run in zip(bare, runs):
            need(isinstance(row, list) and len(row) == units and all(_int(x, 0, run[0]) for x in row),
                 f"plan.bare rows must hold {units} token counts 0..the run's first context")

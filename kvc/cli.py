"""`kvc` command line: thin wrappers over the Python API.

Every user error is one line, `kvc: error: ...`, and exit status 2; `--debug` shows the
traceback instead. Hydra overrides follow the model.yaml: `kvc compile m.yaml hardware=h100-pcie5`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kvc.errors import KvcError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="model.yaml (see examples/)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. hardware=h100-pcie5 hardware.h2d_gbps=40")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvc", description="Compile LLM decoding with the KV cache offloaded to CPU memory.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compile", help="compile a model.yaml into an artifact folder")
    _add_config_args(p)
    p.add_argument("-o", "--output", help="artifact folder (default: <model.yaml stem>.kvc)")

    p = sub.add_parser("plan", help="show the split the solver chooses and its predicted time")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--context", type=int, default=None, help="context length S (default: prompt_len)")

    p = sub.add_parser("profile", help="measure this machine into a hardware config YAML")
    p.add_argument("-o", "--output", help="where to write the YAML (default: print it)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)

    p = sub.add_parser("run", help="generate with a compiled artifact")
    p.add_argument("artifact")
    p.add_argument("--prompt-ids", default=None,
                   help="comma-separated token ids (default: random ids of the compiled prompt length)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--device", default=None)

    p = sub.add_parser("bench", help="compile, load and time decoding for a model.yaml")
    _add_config_args(p)
    p.add_argument("--device", default=None)
    for s in sub.choices.values():  # --debug also after the command, without resetting it
        s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def cmd_compile(args) -> int:
    import kvc

    t0 = time.perf_counter()
    out = kvc.compile(args.config, overrides=args.overrides, output=args.output)
    print(f"kvc: compiled {args.config} -> {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_plan(args) -> int:
    import json

    from kvc.api import resolve
    from kvc.plan_report import plan_json, plan_text

    r = resolve(args.config, args.overrides)
    c = r.config
    kw = dict(batch_size=c.workload.batch_size, prompt_len=c.workload.prompt_len,
              gen_len=c.workload.gen_len, dtype=c.model.dtype, mode=c.schedule.mode,
              chunk_tokens=c.schedule.chunk_tokens, act_chunks=c.schedule.act_chunks,
              recompute_fraction=c.schedule.recompute_fraction, context=args.context)
    if args.json:
        print(json.dumps(plan_json(r.spec, r.hardware, **kw), indent=1))
    else:
        print(plan_text(r.spec, r.hardware, **kw))
    return 0


def cmd_profile(args) -> int:
    from kvc.profiler import profile, write_profile_yaml

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise KvcError("--device cuda: this machine has no CUDA device")
    hw = profile(device, progress=True)
    if args.output:
        write_profile_yaml(hw, Path(args.output))
        print(f"kvc: wrote {args.output}")
    else:
        import dataclasses

        import yaml

        print(yaml.safe_dump(dataclasses.asdict(hw), sort_keys=False))
    return 0


def cmd_run(args) -> int:
    import torch

    import kvc

    model = kvc.load(args.artifact, device=args.device)
    w = model.manifest["config"]["workload"]
    n = args.max_new_tokens or w["gen_len"]
    if args.prompt_ids:
        try:
            ids = [[int(t) for t in args.prompt_ids.split(",")]]
        except ValueError:
            raise KvcError(f"--prompt-ids {args.prompt_ids!r}: expected comma-separated integers") from None
        input_ids = torch.tensor(ids)
    else:
        gen = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, model.spec.vocab_size, (w["batch_size"], w["prompt_len"]), generator=gen)
    if model.manifest["weights"]["kind"] == "dummy":
        print("kvc: note: this artifact has dummy weights; its tokens are meaningless", file=sys.stderr)
    t0 = time.perf_counter()
    out = model.generate(input_ids, n)
    dt = time.perf_counter() - t0
    for row in out[:, input_ids.shape[1]:].tolist():
        print(" ".join(map(str, row)))
    print(f"kvc: {out.shape[0] * n} tokens in {dt:.2f} s ({out.shape[0] * n / dt:.1f} tokens/s)",
          file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    import tempfile

    import torch

    import kvc

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
    return 0


COMMANDS = {"compile": cmd_compile, "plan": cmd_plan, "profile": cmd_profile, "run": cmd_run,
            "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may come after options (`compile m.yaml -o out hardware=cpu`): collect leftovers
    args, extra = parser.parse_known_args(argv)
    flags = [e for e in extra if e.startswith("-")]
    if flags or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(flags or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return COMMANDS[args.command](args)
    except KvcError as e:
        if args.debug:
            raise
        print(f"kvc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in kvc, not the user's input: say so, in one line
        if args.debug:
            raise
        print(f"kvc: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

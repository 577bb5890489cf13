"""`kvc` command line: thin wrappers over the Python API.

Every user error is one line, `kvc: error: ...`, and exit status 2; `--debug` shows the
traceback instead. Hydra overrides follow the model.yaml: `kvc compile m.yaml hardware=h100-pcie5`.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from kvc.errors import KvcError

MAX_PROMPTS_BYTES = 16 << 20
EXIT_BROKEN_PIPE = 128 + 13  # as a command killed by SIGPIPE: the reader went away


def check_device(name: str | None) -> str | None:
    """--device: cpu, cuda or cuda:N (a device this machine has), checked before anything is
    loaded; None: the default (cuda if present)."""
    if name is None:
        return None
    m = re.fullmatch(r"(cpu|cuda)(?::(\d{1,4}))?", name)
    if not m or (m.group(1) == "cpu" and m.group(2)):
        raise KvcError(f"--device {name!r}: kvc runs on cpu or cuda (cuda:N for the N-th GPU)")
    if m.group(1) == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise KvcError(f"--device {name}: this machine has no CUDA device")
        n = torch.cuda.device_count()
        if m.group(2) is not None and int(m.group(2)) >= n:
            raise KvcError(f"--device {name}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    return name


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="model.yaml (see examples/)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. hardware=h100-pcie5 hardware.h2d_gbps=40")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvc", description="Compile LLM decoding with the KV cache offloaded to CPU memory.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compile", help="compile a model.yaml into an artifact folder")
    _add_config_args(p)
    p.add_argument("-o", "--output", help="artifact folder (default: <model.yaml stem>.kvc)")

    p = sub.add_parser("plan", help="show the split the solver chooses and its predicted time")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--context", type=int, default=None, help="context length S (default: prompt_len)")
    p.add_argument("--timeline", metavar="PNG", default=None,
                   help="draw the predicted per-stream timeline of one decode step (needs matplotlib)")
    p.add_argument("--search", metavar="MAX_BATCH", type=int, default=None,
                   help="policy search: the batch (up to MAX_BATCH) and micro-batch count with the "
                        "highest predicted decode throughput that fits the budgets")

    p = sub.add_parser("profile", help="measure this machine into a hardware config YAML")
    p.add_argument("-o", "--output", help="where to write the YAML (default: print it)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)

    p = sub.add_parser("run", help="generate with a compiled artifact (streams the text)")
    p.add_argument("artifact")
    p.add_argument("--prompt", default=None, help="text, tokenized with the checkpoint's own tokenizer")
    p.add_argument("--prompts-file", default=None, help="one prompt per line, each run in turn")
    p.add_argument("--prompt-ids", default=None,
                   help="comma-separated token ids (default: random ids of the compiled prompt length)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")

    p = sub.add_parser("bench", help="compile, load and time decoding for a model.yaml")
    _add_config_args(p)
    p.add_argument("--device", default=None)
    p.add_argument("--trace", metavar="DIR", default=None,
                   help="write torch.profiler's Chrome trace of one decode step, and the predicted one")

    p = sub.add_parser("inspect", help="what an artifact was compiled for, and its predicted speed-up")
    p.add_argument("artifact")
    for s in sub.choices.values():  # --debug also after the command, without resetting it
        s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        s.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)
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


def _prompts(args) -> list[str] | None:
    if args.prompt is not None and args.prompts_file is not None:
        raise KvcError("give --prompt or --prompts-file, not both")
    if args.prompts_file is not None:
        try:
            with open(args.prompts_file, "rb") as f:
                data = f.read(MAX_PROMPTS_BYTES + 1)
            if len(data) > MAX_PROMPTS_BYTES:
                raise KvcError(f"--prompts-file {args.prompts_file}: larger than "
                               f"{MAX_PROMPTS_BYTES >> 20} MiB")
            lines = data.decode("utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise KvcError(f"--prompts-file {args.prompts_file}: cannot read it "
                           f"({getattr(e, 'strerror', None) or e})") from None
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise KvcError(f"--prompts-file {args.prompts_file}: no prompts (one per line)")
        return prompts
    return None if args.prompt is None else [args.prompt]


def _new_tokens(model, p: int, asked: int | None) -> int:
    """How many tokens to generate after a p-token prompt: as asked, else the compiled gen_len
    clipped to the contexts the plan covers. A prompt the plan cannot serve is an error that
    says which lengths it can."""
    spec, plan = model.spec, model.plan
    if p + (asked or 1) > spec.max_positions:
        raise KvcError(f"the prompt is {p} tokens{f' + {asked} new' if asked else ''}; the "
                       f"model's maximum positions is {spec.max_positions}")

    def covers(s: int) -> bool:
        try:
            return all(plan.recompute_tokens(i, s) >= 0 for i in range(plan.num_units))
        except ValueError:
            return False

    lo, hi = plan.prompt_len, plan.prompt_len + plan.gen_len
    if not covers(p):
        raise KvcError(f"the prompt is {p} tokens; this artifact's plan covers prompts of {lo}.."
                       f"{hi} tokens: recompile with workload.prompt_len={p} (or set "
                       f"schedule.recompute_fraction, which covers any length)")
    n = asked or max(1, min(plan.gen_len, hi - p + 2, spec.max_positions - p))
    if n > 1 and not covers(p + n - 2):
        raise KvcError(f"--max-new-tokens {n}: a {p}-token prompt may grow to {hi + 2 - p} new "
                       f"tokens under this artifact's plan (contexts {lo}..{hi})")
    return n


def cmd_run(args) -> int:
    import torch

    import kvc
    from kvc import progress

    check_device(args.device)
    prompts = _prompts(args)
    if prompts is not None and args.prompt_ids:
        raise KvcError("give --prompt/--prompts-file or --prompt-ids, not both")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise KvcError(f"--max-new-tokens {args.max_new_tokens}: expected >= 1")
    model = kvc.load(args.artifact, device=args.device)
    m = model.manifest
    if m.get("hardware", {}).get("device") == "cuda" and model.device.type == "cpu":
        print(f"kvc: note: compiled for CUDA ({m['hardware'].get('name')}); running the same "
              "schedule on the CPU (streams are no-ops; slow)", file=sys.stderr)
    dummy = m["weights"]["kind"] == "dummy"
    if prompts is None:
        return _run_ids(args, model, dummy)
    tok = None
    if dummy:
        print("kvc: note: this artifact has dummy weights and no tokenizer: the prompt is "
              "encoded as its UTF-8 bytes, the output printed as token ids, and both are "
              "meaningless", file=sys.stderr)
    else:
        from kvc.tokenizer import load_tokenizer

        tok = load_tokenizer(m["weights"]["path"])
    total, t0 = 0, time.perf_counter()
    for k, text in enumerate(prompts):
        ids = tok.encode(text) if tok else [b % model.spec.vocab_size for b in text.encode()]
        if not ids:
            raise KvcError(f"prompt {k + 1} is empty after tokenizing")
        n = _new_tokens(model, len(ids), args.max_new_tokens)
        if k:
            print()
        sys.stdout.write(text if tok else (" ".join(map(str, ids)) + " |"))
        sys.stdout.flush()
        out: list[int] = []
        shown = ""

        def stream(step, new, out=out):
            nonlocal shown
            out.append(int(new[0]))  # one host sync per token: the price of streaming
            if tok is None:
                sys.stdout.write(f" {out[-1]}")
            else:  # decode the whole tail: a token may complete a character begun earlier
                text_now = tok.decode(out)
                sys.stdout.write(text_now[len(shown):] if text_now.startswith(shown) else "")
                shown = text_now
            sys.stdout.flush()

        # the bar and the streamed text would share one terminal line: text wins
        with progress.enabled(False):
            model.generate(torch.tensor([ids]), n, on_token=stream)
        print()
        total += n
    dt = time.perf_counter() - t0
    print(f"kvc: {total} tokens in {dt:.2f} s ({total / dt:.1f} tokens/s)", file=sys.stderr)
    return 0


def _run_ids(args, model, dummy: bool) -> int:
    import torch

    w = model.manifest["config"]["workload"]
    if args.prompt_ids:
        try:
            ids = [[int(t) for t in args.prompt_ids.split(",")]]
        except ValueError:
            raise KvcError(f"--prompt-ids {args.prompt_ids!r}: expected comma-separated integers") from None
        bad = [t for t in ids[0] if not 0 <= t < model.spec.vocab_size]
        if bad:
            raise KvcError(f"--prompt-ids: token id {bad[0]} is outside the vocabulary "
                           f"(0..{model.spec.vocab_size - 1})")
        input_ids = torch.tensor(ids)
        n = _new_tokens(model, input_ids.shape[1], args.max_new_tokens)
    else:
        gen = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, model.spec.vocab_size, (w["batch_size"], w["prompt_len"]), generator=gen)
        n = args.max_new_tokens or w["gen_len"]
    if dummy:
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


def cmd_inspect(args) -> int:
    from kvc.reports.inspect import inspect_text

    print(inspect_text(args.artifact))
    return 0


COMMANDS = {"compile": cmd_compile, "plan": cmd_plan, "profile": cmd_profile, "run": cmd_run,
            "bench": cmd_bench, "inspect": cmd_inspect}


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
        from kvc import progress

        with progress.enabled(not args.no_progress):
            rc = COMMANDS[args.command](args)
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
            return rc
    except BrokenPipeError:  # `kvc inspect X | head -1`: the reader is gone; so are we, quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # the exit's flush has nowhere to fail
        except (OSError, ValueError):
            pass
        return EXIT_BROKEN_PIPE
    except KvcError as e:
        if args.debug:
            raise
        print(f"kvc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
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

"""`kvc run`: generate with a compiled artifact (a streamed prompt, a prompts file, token ids,
a JSONL job through kvc.jobs), and the --device check shared with `kvc bench`."""
from __future__ import annotations

import os
import re
import sys
import time

from kvc.errors import KvcError

MAX_PROMPTS_BYTES = 16 << 20


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


def _prompts(args) -> list[str] | None:
    if args.prompt is not None and args.prompts_file is not None:
        raise KvcError("give --prompt or --prompts-file, not both")
    if args.prompts_file is not None:
        where = "stdin" if args.prompts_file == "-" else args.prompts_file
        try:
            if args.prompts_file == "-":
                data = sys.stdin.buffer.read(MAX_PROMPTS_BYTES + 1)
            else:
                with open(args.prompts_file, "rb") as f:
                    data = f.read(MAX_PROMPTS_BYTES + 1)
            if len(data) > MAX_PROMPTS_BYTES:
                raise KvcError(f"--prompts-file {where}: larger than {MAX_PROMPTS_BYTES >> 20} MiB")
            lines = data.decode("utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise KvcError(f"--prompts-file {where}: cannot read it "
                           f"({getattr(e, 'strerror', None) or e})") from None
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise KvcError(f"--prompts-file {where}: no prompts (one per line)")
        return prompts
    return None if args.prompt is None else [args.prompt]


def eos_flag(value: str | None):
    """--eos-token-id: None (the checkpoint's), 'none' (never stop on a token) or ids '2,32000'."""
    if value is None:
        return None
    if value.strip().lower() == "none":
        return ()
    try:
        return tuple(int(t) for t in value.split(","))
    except ValueError:
        raise KvcError(f"--eos-token-id {value!r}: expected token ids (2 or 2,32000) or none") from None


def settings(args) -> dict:
    """The sampling flags that were given (the rest keep generate's transformers defaults)."""
    out = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "repetition_penalty", "seed")
           if getattr(args, k) is not None}
    if args.do_sample:
        out["do_sample"] = True
    return out


def _check_args(args, prompts) -> None:
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise KvcError(f"--max-new-tokens {args.max_new_tokens}: expected >= 1")
    if prompts is not None and args.prompt_ids:
        raise KvcError("give --prompt/--prompts-file or --prompt-ids, not both")
    if args.input is not None:
        if args.prompt is not None or args.prompts_file is not None or args.prompt_ids:
            raise KvcError("--input runs a JSONL job; give it without --prompt/--prompts-file/--prompt-ids")
        if args.output is None:
            raise KvcError("--input needs --output (a file, or - for stdout)")
        # what can be checked before a model loads (minutes, for a large one)
        if args.input != "-" and not os.access(args.input, os.R_OK):
            raise KvcError(f"--input {args.input}: cannot read it (no such file, or not readable)")
        partial = f"{args.output}.partial"
        if args.output != "-" and not args.resume and os.path.exists(partial):
            raise KvcError(f"{partial} is left from an interrupted job: pass --resume to continue "
                           "it, or delete it to start over")
    elif args.output is not None or args.resume:
        raise KvcError("--output and --resume belong to a JSONL job: give --input too")
    if args.stop and prompts is None and args.input is None:
        raise KvcError("--stop needs text: give --prompt, --prompts-file or --input")


def launch(args) -> int:
    """`kvc run ART --nproc N`: the same command in N processes, one per GPU, through torchrun
    (torch.distributed.run, standalone on this host), after the checks that need no model."""
    from kvc.artifact import read_manifest
    from kvc.runtime.parallel import env_world

    n = args.nproc
    if env_world() > 1:
        raise KvcError("--nproc inside a torchrun job: torchrun already started the processes; "
                       "drop --nproc")
    want = read_manifest(args.artifact)["plan"].get("world_size", 1)
    if want != n:
        raise KvcError(f"--nproc {n}: {args.artifact} was compiled for parallel.world_size = {want}"
                       f"; run it with --nproc {want}, or recompile with parallel.world_size={n}")
    if args.device is None or args.device.startswith("cuda"):
        import torch

        have = torch.cuda.device_count()
        if args.device is None and not have:
            args.device = "cpu"
        elif have < n:
            raise KvcError(f"--nproc {n}: this machine has {have} CUDA device(s); one process "
                           "runs per GPU (--device cpu runs the processes on the CPU)")
    rest, skip = [], False
    for a in getattr(args, "argv", sys.argv[1:]):
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    if args.device == "cpu" and "--device" not in rest and not any(a.startswith("--device=") for a in rest):
        rest += ["--device", "cpu"]
    # torchrun would set 1 thread per process (and say so); the host's cores shared out instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    return start_ranks(n, [sys.executable, "-m", "kvc", *rest])


def start_ranks(n: int, cmd: list[str]) -> int:
    """`cmd` in n processes on this host, as `torchrun --standalone --nproc-per-node n` starts
    them (torch's launcher API), and their exit status: 0, or the first failed rank's. Each
    rank says its own error; the launcher's report of the failure is not repeated."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"kvc-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1)
    try:
        elastic_launch(config, cmd[0])(*cmd[1:])
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        return first.exitcode if first.exitcode and first.exitcode > 0 else 1
    return 0


def cmd_run(args) -> int:
    import kvc
    from kvc.runtime.parallel import env_world

    check_device(args.device)
    if args.nproc is not None and args.nproc < 1:
        raise KvcError(f"--nproc {args.nproc}: expected >= 1")
    if (args.nproc or 1) > 1 or env_world() > 1:
        if "-" in (args.input, args.prompts_file):
            raise KvcError("several processes cannot share stdin: give --input/--prompts-file a file")
        if args.nproc and args.nproc > 1:
            prompts = None if args.input is not None else _prompts(args)
            _check_args(args, prompts)
            return launch(args)
    if args.input == "-" and args.prompts_file == "-":
        raise KvcError("stdin can be --input or --prompts-file, not both")
    prompts = None if args.input is not None else _prompts(args)
    _check_args(args, prompts)
    eos = eos_flag(args.eos_token_id)
    sampling = settings(args)
    model = kvc.load(args.artifact, device=args.device)
    m = model.manifest
    if m.get("hardware", {}).get("device") == "cuda" and model.device.type == "cpu":
        print(f"kvc: note: compiled for CUDA ({m['hardware'].get('name')}); running the same "
              "schedule on the CPU (streams are no-ops; slow)", file=sys.stderr)
    dummy = m["weights"]["kind"] == "dummy"
    if args.input is not None:
        from kvc.jobs import run_job

        summary = run_job(model, args.input, args.output, resume=args.resume,
                          on_error=args.on_error, window=args.window,
                          max_new_tokens=args.max_new_tokens, stop=args.stop, eos_token_id=eos,
                          **sampling)
        print(summary.line(), file=sys.stderr)
        return 0
    if prompts is None:
        return _run_ids(args, model, dummy, eos, sampling)
    if model.tokenizer is None and not dummy:
        from kvc.tokenizer import load_tokenizer

        load_tokenizer(m["weights"]["path"])  # raises its one line: the folder has no tokenizer
    return _run_text(args, model, prompts, dummy, eos, sampling)


def _run_text(args, model, prompts: list[str], dummy: bool, eos, sampling: dict) -> int:
    from kvc import progress

    tok = model.tokenizer
    if tok is None:
        print("kvc: note: this artifact has dummy weights and no tokenizer: the prompt is "
              "encoded as its UTF-8 bytes, the output printed as token ids, and both are "
              "meaningless", file=sys.stderr)
        items = [[b % model.spec.vocab_size for b in text.encode()] for text in prompts]
    else:
        items = list(prompts)
    if any(not item for item in items):
        raise KvcError(f"prompt {[bool(i) for i in items].index(False) + 1} is empty")
    t0 = time.perf_counter()
    kw = dict(max_new_tokens=args.max_new_tokens, stop=args.stop or None, eos_token_id=eos,
              **sampling)
    if len(items) == 1 and tok is not None:  # streamed, each piece a whole character
        sys.stdout.write(prompts[0])
        sys.stdout.flush()

        def show(i, piece):
            sys.stdout.write(piece)
            sys.stdout.flush()

        with progress.enabled(False):  # the bar and the text would share one terminal line
            done = model.complete(items, on_text=show, **kw)
        print()
    else:
        done = model.complete(items, **kw)
        for k, (text, c) in enumerate(zip(prompts, done)):
            if k:
                print()
            if tok is None:
                print(" ".join(map(str, items[k])) + " | " + " ".join(map(str, c.token_ids)))
            else:
                print(text + c.text)
    total = sum(c.completion_tokens for c in done)
    dt = time.perf_counter() - t0
    reasons = ", ".join(sorted({c.finish_reason for c in done}))
    print(f"kvc: {total} tokens in {dt:.2f} s ({total / dt:.1f} tokens/s; finished by {reasons})",
          file=sys.stderr)
    return 0


def _run_ids(args, model, dummy: bool, eos, sampling: dict) -> int:
    import torch

    w = model.manifest["config"]["workload"]
    note = "kvc: note: this artifact has dummy weights; its tokens are meaningless"
    if args.prompt_ids:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",")]
        except ValueError:
            raise KvcError(f"--prompt-ids {args.prompt_ids!r}: expected comma-separated integers") from None
        t0 = time.perf_counter()
        c = model.complete([ids], args.max_new_tokens, eos_token_id=eos, **sampling)[0]
        dt = time.perf_counter() - t0
        if dummy:  # after the ids were accepted: a refused prompt gets its one error line only
            print(note, file=sys.stderr)
        print(" ".join(map(str, c.token_ids)))
        print(f"kvc: {c.completion_tokens} tokens in {dt:.2f} s ({c.completion_tokens / dt:.1f} "
              f"tokens/s; finished by {c.finish_reason})", file=sys.stderr)
        return 0
    if dummy:
        print(note, file=sys.stderr)
    # no prompt: random ids of the compiled shape, a timing run (no EOS unless --eos-token-id)
    p = w["prompt_len"]
    n = args.max_new_tokens or w["gen_len"]
    if p + n > model.max_context:
        raise KvcError(f"--max-new-tokens {n}: the compiled prompt of {p} tokens + {n} new exceeds "
                       f"this artifact's {model.max_context} tokens per row")
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.spec.vocab_size, (w["batch_size"], p), generator=gen)
    t0 = time.perf_counter()
    out = model.generate(input_ids, n, eos_token_id=list(eos) if eos else None, **sampling)
    dt = time.perf_counter() - t0
    for row in out[:, p:].tolist():
        print(" ".join(map(str, row)))
    made = out[:, p:].numel()
    print(f"kvc: {made} tokens in {dt:.2f} s ({made / dt:.1f} tokens/s)", file=sys.stderr)
    return 0

"""`kvc` command line: thin wrappers over the Python API.

Every user error is one line, `kvc: error: ...`, and exit status 2; `--debug` shows the
traceback instead. Hydra overrides follow the model.yaml: `kvc compile m.yaml hardware=h100-pcie5`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from kvc.cli.bench import cmd_bench
from kvc.cli.commands import cmd_compile, cmd_inspect, cmd_plan, cmd_profile
from kvc.cli.run import MAX_PROMPTS_BYTES, check_device, cmd_run
from kvc.errors import KvcError

__all__ = ["COMMANDS", "EXIT_BROKEN_PIPE", "MAX_PROMPTS_BYTES", "build_parser", "check_device",
           "cmd_bench", "cmd_compile", "cmd_inspect", "cmd_plan", "cmd_profile", "cmd_run", "main"]

EXIT_BROKEN_PIPE = 128 + 13  # as a command killed by SIGPIPE: the reader went away


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="model.yaml (see examples/)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. hardware=h100-pcie5 hardware.h2d_gbps=40")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact")
    p.add_argument("--prompt", default=None,
                   help="text, tokenized with the checkpoint's own tokenizer; the completion is streamed")
    p.add_argument("--prompts-file", default=None,
                   help="one prompt per line (- for stdin), batched, printed in order")
    p.add_argument("--prompt-ids", default=None,
                   help="comma-separated token ids (default: random ids of the compiled prompt length)")
    p.add_argument("--input", default=None, metavar="JSONL",
                   help='a JSONL job (- for stdin): a line per prompt, {"prompt": ...}, '
                        '{"messages": [...]} or {"prompt_ids": [...]}, optional max_new_tokens, stop')
    p.add_argument("--output", default=None, metavar="JSONL",
                   help="the job's results, a line per input line in order (- for stdout); written to "
                        "OUTPUT.partial and renamed when the job completes")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted job from what OUTPUT(.partial) already holds")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="a malformed input line: fail (default; checked before generating) or skip "
                        "(reported, and written as a line with an 'error' field)")
    p.add_argument("--window", type=int, default=None, metavar="LINES",
                   help="a job's lines sorted and written together (default: 8 compiled batches)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the compiled gen_len; never past the artifact's tokens per row")
    p.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--eos-token-id", default=None, metavar="IDS",
                   help="ids that end a row, e.g. 2 or 2,32000, or none (default: the checkpoint's)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="a string that ends a row, cut from its text (repeatable)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="run on N GPUs (one process each, started through torchrun) for an artifact "
                        "compiled with parallel.world_size=N")


def build_parser() -> argparse.ArgumentParser:
    from kvc.version import __version__

    parser = argparse.ArgumentParser(
        prog="kvc", description="Compile LLM decoding with the KV cache offloaded to CPU memory.")
    parser.add_argument("--version", action="version", version=f"kvc {__version__}")
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
    _add_run_args(p)

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


COMMANDS = {"compile": cmd_compile, "plan": cmd_plan, "profile": cmd_profile, "run": cmd_run,
            "bench": cmd_bench, "inspect": cmd_inspect}


@contextlib.contextmanager
def quiet(on: bool):
    """stdout and stderr to nowhere inside the block when `on` (a multi-GPU job's rank > 0)."""
    if not on:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may come after options (`compile m.yaml -o out hardware=cpu`): collect leftovers
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    flags = [e for e in extra if e.startswith("-")]
    if flags or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(flags or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    from kvc.runtime.parallel import env_rank

    rank, stderr = env_rank(), sys.stderr
    try:
        from kvc import progress

        # in a multi-GPU job (torchrun) rank 0 speaks for all: the others print nothing but
        # their own errors, and write no files
        with progress.enabled(not args.no_progress and not rank), quiet(rank):
            rc = COMMANDS[args.command](args)
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
            if rc == 0:
                from kvc.runtime.parallel import finish

                if finish():  # a multi-GPU job's ranks end together, past gloo's teardown
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(0)
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
        print(f"kvc: error: {f'[rank {rank}] ' if rank else ''}{e}", file=stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("kvc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in kvc, not the user's input: say so, in one line
        if args.debug:
            raise
        print(f"kvc: internal error: {f'[rank {rank}] ' if rank else ''}{type(e).__name__}: {e} "
              "(rerun with --debug for the traceback)", file=stderr)
        return 1

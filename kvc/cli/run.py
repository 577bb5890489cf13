"""`kvc run`: generate with a compiled artifact (prompts, token ids, streamed text), and the
--device check shared with `kvc bench`."""
from __future__ import annotations

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

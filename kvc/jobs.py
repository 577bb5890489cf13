"""JSONL batch jobs: `kvc run ART --input prompts.jsonl --output results.jsonl`.

Input: one JSON object a line, with exactly one of `prompt` (a text), `messages` (a chat,
through the checkpoint's chat template) or `prompt_ids` (token ids), and optionally
`max_new_tokens` (an integer >= 1) and `stop` (a string or a list of them). Any other field is
the user's and is kept. Sampling settings are the job's (command-line flags): a line naming one
is malformed, as is a line carrying a field kvc writes. Blank lines are not records.

Output: one line per input record, in input order: the input's fields plus `text`,
`token_ids`, `finish_reason` (eos|stop|length), `prompt_tokens`, `completion_tokens`; so
output line k answers input record k. A malformed record (bad JSON, no or two prompt fields,
wrong types, too long for the artifact) is reported as `FILE:LINE: why`; with
`on_error="fail"` (the default) the job stops before generating anything (every record is
checked first); with `"skip"` its output line is its fields (or `{"input": the raw line}`)
plus `error`, and the job goes on.

Records go through the model in windows of `window` records: each window is sorted by length
into batches of the compiled batch size, and its results are written in input order and
flushed, so an interrupted job keeps every window that finished. A file output is written to
`OUTPUT.partial` and renamed to OUTPUT when the job completes: a file named OUTPUT is always a
whole job. `resume=True` continues `OUTPUT.partial` (or OUTPUT), after checking that each line
there answers the same input record; a half-written last line (a kill mid-write) is dropped
and redone. `-` is stdin / stdout (stdout cannot be resumed).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kvc.errors import KvcError
from kvc.progress import bar, enabled
from kvc.runtime.parallel import SINGLE
from kvc.text import SAMPLING, Request, check_length, encode, run_requests, stop_strings

PROMPT_KEYS = ("prompt", "messages", "prompt_ids")
RESULT_KEYS = ("text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens", "error")
DEFAULT_WINDOW_BATCHES = 8


@dataclass
class JobSummary:
    prompts: int  # records answered in this run (skipped ones included)
    skipped: int
    resumed: int  # records already in the output when the run began
    tokens: int  # new tokens generated in this run
    seconds: float
    output: str

    def line(self) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        pps = self.prompts / self.seconds if self.seconds > 0 else 0.0
        extra = "".join([f", {self.skipped} skipped" if self.skipped else "",
                         f", {self.resumed} already done" if self.resumed else ""])
        return (f"kvc: {self.prompts} prompts{extra}, {self.tokens} tokens in {self.seconds:.2f} s "
                f"({rate:.1f} tokens/s, {pps:.2f} prompts/s) -> {self.output}")


def read_records(path: str) -> tuple[str, list[tuple[int, str | None]]]:
    """(name, [(line number, text or None when it is not UTF-8)]) for non-blank lines."""
    name = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as e:
        raise KvcError(f"--input {path}: cannot read it ({e.strerror or e})") from None
    out = []
    for k, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            out.append((k, raw.rstrip(b"\r").decode("utf-8")))
        except UnicodeDecodeError:
            out.append((k, None))
    return name, out


def parse(raw: str | None, model, tokenizer) -> tuple[dict | None, Request]:
    """(the record, its Request) or a KvcError naming what is wrong with the line."""
    if raw is None:
        raise KvcError("not UTF-8 text")
    try:
        rec = json.loads(raw)
    except ValueError as e:
        raise KvcError(f"not JSON ({e})") from None
    if not isinstance(rec, dict):
        raise KvcError(f"expected a JSON object, got {type(rec).__name__}")
    given = [k for k in PROMPT_KEYS if k in rec]
    if len(given) != 1:
        raise KvcError(f"expected exactly one of {', '.join(map(repr, PROMPT_KEYS))}, "
                       f"got {'none' if not given else ' and '.join(given)}")
    for k in rec:
        if k in SAMPLING or k == "eos_token_id":
            raise KvcError(f"{k!r} is a job-wide setting (kvc run --{k.replace('_', '-')}), "
                           "not a per-line one")
        if k in RESULT_KEYS:
            raise KvcError(f"field {k!r} is one kvc writes; rename it")
    key = given[0]
    value = rec[key]
    if key == "prompt" and not isinstance(value, str):
        raise KvcError(f"'prompt' must be a string, got {type(value).__name__}")
    if key == "messages" and not (isinstance(value, list) and value
                                  and all(isinstance(m, dict) for m in value)):
        raise KvcError("'messages' must be a non-empty list of objects ({\"role\": ..., \"content\": ...})")
    if key == "prompt_ids" and not (isinstance(value, list) and value
                                    and all(isinstance(t, int) and not isinstance(t, bool) for t in value)):
        raise KvcError("'prompt_ids' must be a non-empty list of integers")
    n = rec.get("max_new_tokens")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise KvcError(f"'max_new_tokens' = {n!r}; expected an integer >= 1")
    stop = stop_strings(rec.get("stop"))
    ids = encode(tokenizer, value, model.spec.vocab_size, f"'{key}'")
    check_length(len(ids), model.max_context, f"'{key}'")
    return rec, Request(ids, n, stop)


def _bad_line(raw: str | None, error: str) -> dict:
    try:
        rec = json.loads(raw) if raw is not None else None
    except ValueError:
        rec = None
    if isinstance(rec, dict):
        return {**{k: v for k, v in rec.items() if k not in RESULT_KEYS}, "error": error}
    return {"input": raw, "error": error}


def _answers(out: dict, raw: str | None) -> bool:
    """Whether an output line answers this input line (its fields, or its raw text)."""
    if "input" in out and "prompt" not in out and "messages" not in out and "prompt_ids" not in out:
        return out["input"] == raw
    try:
        rec = json.loads(raw)
    except (TypeError, ValueError):
        return False
    return isinstance(rec, dict) and all(out.get(k) == v for k, v in rec.items() if k not in RESULT_KEYS)


def resume_point(path: Path, name: str, records: list) -> int:
    """How many records `path` already answers; a torn last line is cut off the file."""
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        print(f"kvc: note: {path}: dropped a half-written last line ({len(data) - cut} bytes); "
              "it is redone", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(cut)
    lines = data[:cut].split(b"\n")[:-1]
    if len(lines) > len(records):
        raise KvcError(f"{path}: {len(lines)} results, but {name} has only {len(records)} records; "
                       "is it the output of another input?")
    for k, (line, (number, raw)) in enumerate(zip(lines, records), 1):
        try:
            out = json.loads(line)
        except ValueError:
            raise KvcError(f"{path}:{k}: not a JSON line; the file is damaged (delete it to start "
                           "over)") from None
        if not isinstance(out, dict) or not _answers(out, raw):
            raise KvcError(f"{path}:{k}: does not answer {name}:{number}; the input changed since "
                           f"the job began (delete {path} to start over)")
    return len(lines)


def _open_output(output: str, resume: bool, name: str, records: list):
    """(file, partial path or None, final path or None, records done)."""
    if output == "-":
        if resume:
            raise KvcError("--resume needs an output file (it reads what is there); not -")
        return sys.stdout, None, None, 0
    final = Path(output)
    partial = final.with_name(final.name + ".partial")
    if final.is_dir():
        raise KvcError(f"--output {output}: is a folder; expected a file")
    done = 0
    if resume and not partial.exists() and final.is_file():
        done = resume_point(final, name, records)
        if done < len(records):
            os.replace(final, partial)  # it grows again; OUTPUT reappears when it is whole
    elif resume and partial.is_file():
        done = resume_point(partial, name, records)
    elif partial.exists():
        raise KvcError(f"{partial} is left from an interrupted job: pass --resume to continue it, "
                       "or delete it to start over")
    if done == len(records) and not partial.exists():
        return None, None, final, done
    try:
        f = open(partial, "a" if done else "w", encoding="utf-8")  # noqa: SIM115 - closed at the end of run_job
    except OSError as e:
        raise KvcError(f"--output {output}: cannot write {partial} ({e.strerror or e})") from None
    return f, partial, final, done


def _open_output_once(model, output: str, resume: bool, name: str, records: list):
    """_open_output on rank 0 of a multi-GPU job (alone: here); the other ranks run the same
    records and write nothing (kvc.runtime.parallel: every rank returns every row)."""
    ranks = getattr(model, "ranks", SINGLE)
    if ranks.single:
        return _open_output(output, resume, name, records)
    opened, why = None, None
    if ranks.rank == 0:
        try:
            opened = _open_output(output, resume, name, records)
        except KvcError as e:
            why = str(e)
    why, done = ranks.broadcast((why, None if opened is None else opened[3]))
    if why is not None:
        raise KvcError(why)
    if opened is not None:
        return opened
    return (open(os.devnull, "w", encoding="utf-8") if done < len(records) else None,
            None, None, done)


def run_job(model, input_path: str, output: str, *, resume: bool = False, on_error: str = "fail",
            window: int | None = None, max_new_tokens: int | None = None, stop=None,
            eos_token_id=None, **sampling) -> JobSummary:
    """Run a JSONL job (see the module docstring). `max_new_tokens`, `stop`: defaults for
    lines that give none (a line's `stop` replaces the job's)."""
    if on_error not in ("fail", "skip"):
        raise KvcError(f"--on-error {on_error!r}: expected fail or skip")
    window = window or DEFAULT_WINDOW_BATCHES * model.batch_size
    if window < 1:
        raise KvcError(f"--window {window}: expected >= 1")
    job_stop = stop_strings(stop)
    tokenizer = model.tokenizer
    name, records = read_records(input_path)
    errors = {}
    for number, raw in records:  # every line checked before anything is generated
        try:
            parse(raw, model, tokenizer)
        except KvcError as e:
            errors[number] = str(e)
    if errors and on_error == "fail":
        first = min(errors)
        more = f" ({len(errors) - 1} more bad lines; --on-error skip writes them as error lines)" \
            if len(errors) > 1 else " (--on-error skip writes it as an error line and goes on)"
        raise KvcError(f"{name}:{first}: {errors[first]}{more}")
    f, partial, final, done = _open_output_once(model, output, resume, name, records)
    t0, tokens, skipped = time.perf_counter(), 0, 0
    todo = records[done:]
    with bar("kvc: job", total=len(records), unit="prompt") as shown:
        shown.update(done)
        for w in range(0, len(todo), window):
            chunk = todo[w:w + window]
            out: list[dict | None] = [None] * len(chunk)
            reqs, where = [], []
            for k, (number, raw) in enumerate(chunk):
                if number in errors:
                    print(f"kvc: warning: {name}:{number}: {errors[number]} (skipped)", file=sys.stderr)
                    out[k] = _bad_line(raw, errors[number])
                    skipped += 1
                    continue
                rec, req = parse(raw, model, tokenizer)
                if not req.stop:
                    req.stop = job_stop
                if req.max_new_tokens is None:
                    req.max_new_tokens = max_new_tokens
                out[k] = rec
                reqs.append(req)
                where.append(k)
            shown.update(len(chunk) - len(reqs))
            with enabled(False):  # generate's own bar would fight the job's for the line
                batches = run_requests(model, tokenizer, reqs, eos_token_id=eos_token_id, **sampling)
                for idx, comps in batches:
                    for i, c in zip(idx, comps):
                        out[where[i]] = {**out[where[i]], **c.to_dict()}
                        tokens += c.completion_tokens
                    shown.update(len(idx))
                    dt = time.perf_counter() - t0
                    shown.set_description(f"kvc: job ({tokens / dt:.0f} tokens/s)")
            f.write("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in out))
            f.flush()
            if partial is not None:
                os.fsync(f.fileno())
    if partial is not None:
        f.close()
        os.replace(partial, final)
    elif f is not None and f is not sys.stdout:
        f.close()  # a rank > 0's stand-in
    return JobSummary(len(todo), skipped, done, tokens, time.perf_counter() - t0,
                      "<stdout>" if output == "-" else str(final))

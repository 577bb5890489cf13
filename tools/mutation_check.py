#!/usr/bin/env python
"""Mutation check of kvc's safety tests (issue 16): does some test fail when a cleanup or
validation line is gone?

The working tree (tracked and untracked, not ignored files) is copied once into a temporary
folder; for each mutation below, one line of one file there is removed (the whole statement
starting on it is replaced by `pass`) or rewritten, the tests named for it run against the
copy (PYTHONPATH puts the copy's kvc first; kvc/passes and kvc/conf are linked as the
package expects), and the file is put back. A mutation no test notices is a line whose
protection is untested. Each run has a time limit and a memory limit (a mutation that lets
a billion laughs expand is caught by the limit, not by the machine).

    python tools/mutation_check.py              # every mutation, then the table
    python tools/mutation_check.py --list       # the mutations
    python tools/mutation_check.py --only 3 7   # some of them

Prints one row per mutation: its id, what it removes, file:line, and the first test that
failed (NONE when every test passed; TIMEOUT when the run hit the time limit).
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 300
MEMORY_LIMIT = 4 << 30  # address space of each pytest run

A, BI, C, F = "tests/test_artifact.py", "tests/test_bad_input.py", "tests/test_config.py", "tests/test_fuzz.py"


@dataclass
class Mutation:
    what: str  # the protection the line gives
    file: str
    pattern: str  # a regex matching exactly one line of `file` (after `after`, if given)
    tests: list[str]  # pytest node ids or files, run in the copy
    sub: tuple[str, str] | None = None  # rewrite the line (regex, replacement) instead of removing it
    after: str | None = None  # the line is the first match after a line matching this


MUTATIONS = [
    # --- the artifact folder: what is replaced, and how
    Mutation("refuse a non-artifact before any work", "kvc/artifact/write.py",
             r"_check_replaceable\(out, missing_ok=True\)", [f"{A}::test_only_a_kvc_artifact_is_replaced"]),
    Mutation("refuse a non-artifact at placing time", "kvc/artifact/replace.py", r"^\s+_check_replaceable\(out\)$",
             [f"{A}::test_a_folder_that_appears_while_compiling_is_not_replaced"]),
    Mutation("refuse a folder holding other files", "kvc/artifact/replace.py", r"refuse\(f\"it holds",
             [f"{A}::test_only_a_kvc_artifact_is_replaced", f"{BI}::test_compile_onto_a_folder_that_is_not_an_artifact"],
             after=r"other = sorted"),
    Mutation("refuse a manifest that does not name kvc's format", "kvc/artifact/replace.py",
             r"refuse\(f\"\{MANIFEST\} does not name", [f"{A}::test_only_a_kvc_artifact_is_replaced"]),
    Mutation("refuse a symbolic link at the name", "kvc/artifact/replace.py", r"refuse\(\"a symbolic link\"\)",
             [f"{A}::test_a_symlink_is_not_replaced"]),
    Mutation("refuse the current folder (-o .)", "kvc/artifact/write.py", r"if not out.name or \(cwd is not None",
             [f"{A}::test_output_is_the_current_folder", f"{BI}::test_compile_onto_the_current_folder"]),
    Mutation("exchange atomically (else two renames)", "kvc/artifact/replace.py", r"if _exchange\(tmp, out\):",
             [f"{A}::test_replacing_swaps_in_one_step"], sub=(r"_exchange\(tmp, out\)", "False")),
    Mutation("put the old artifact back when the second rename fails", "kvc/artifact/replace.py",
             r"^\s+os\.rename\(old, out\)$", [f"{A}::test_interrupted_replace_keeps_one_whole_artifact"]),
    Mutation("remove the replaced artifact after placing", "kvc/artifact/write.py", r"^\s+replace\._remove_tree\(tmp\)$",
             [f"{A}::test_compile_replaces_atomically_and_leaves_no_temp"], after=r"_fsync\(out.parent\)"),
    Mutation("remove the temporary when interrupted", "kvc/artifact/write.py", r"^\s+replace\._remove_tree\(tmp\)$",
             [f"{A}::test_interrupted_replace_keeps_one_whole_artifact", f"{A}::test_interrupted_compile_leaves_nothing"],
             after=r"finally:  # Ctrl-C included"),
    Mutation("hold signals back while the name changes hands", "kvc/artifact/write.py",
             r"with _signals_deferred\(\):  # a Ctrl-C here", [f"{A}::test_ctrl_c_at_every_stage_with_real_signals"],
             sub=(r"with _signals_deferred\(\):", "if True:")),
    Mutation("recover a killed compile's leftovers", "kvc/artifact/write.py", r"^\s+replace\._recover_leftovers\(out\)$",
             [f"{A}::test_leftovers_of_a_killed_compile_are_recovered"]),
    Mutation("keep a live compile's temporary", "kvc/artifact/replace.py", r"_alive\(int\(m\.group\(3\)\)\)",
             [f"{A}::test_leftovers_of_a_killed_compile_are_recovered"], sub=(r"_alive\(int\(m\.group\(3\)\)\)", "False")),
    Mutation("retry when another compile moved the name", "kvc/artifact/replace.py", r"except FileNotFoundError:",
             [f"{A}::test_the_name_moved_away_while_placing", f"{A}::test_concurrent_processes_end_with_one_whole_artifact"],
             sub=(r"FileNotFoundError", "ZeroDivisionError"), after=r"def _place"),
    Mutation("write errors are one KvcError", "kvc/artifact/write.py", r"raise KvcError\(f\"cannot write the artifact \{out\}: \{e",
             [f"{A}::test_unwritable_output_is_one_line_and_leaves_the_old", f"{BI}::test_compile_onto_an_unwritable_filesystem"]),
    Mutation("open artifact files without following links", "kvc/artifact/folder.py", r"getattr\(os, \"O_NOFOLLOW\", 0\)",
             [f"{A}::test_manifest_and_graph_must_be_regular_files_inside"], sub=(r"\| getattr\(os, \"O_NOFOLLOW\", 0\) ", "")),
    Mutation("check an artifact file's size before reading", "kvc/artifact/folder.py", r"if st\.st_size > limit:",
             [f"{A}::test_manifest_and_graph_must_be_regular_files_inside"]),
    Mutation("read regular files only (not a FIFO)", "kvc/artifact/folder.py", r"if not stat\.S_ISREG\(st\.st_mode\):",
             [f"{A}::test_manifest_and_graph_must_be_regular_files_inside"]),
    Mutation("model_spec sizes bounded (3000 layers)", "kvc/artifact/read.py", r"need\(_int\(d\.get\(key\), lo, hi\)",
             [f"{A}::test_crafted_3000_layer_manifest_is_refused_quickly", f"{A}::test_manifest_fields_are_checked"],
             after=r"def _check_spec"),
    Mutation("plan fields typed and bounded", "kvc/artifact/read.py", r"^\s+_check_plan\(m\[\"plan\"\], spec, cfg, need\)$",
             [f"{A}::test_manifest_fields_are_checked", F + "::test_manifest"]),
    Mutation("code_hash is a hex digest", "kvc/artifact/read.py", r"need\(isinstance\(m\[\"code_hash\"\], str\)",
             [f"{A}::test_manifest_fields_are_checked", f"{BI}::test_manifest_field_of_the_wrong_type"]),
    Mutation("weights entry typed (path, hashes)", "kvc/artifact/read.py", r"^\s+_check_weights_entry\(m\[\"weights\"\], where\)$",
             [f"{A}::test_manifest_fields_are_checked", f"{BI}::test_manifest_field_of_the_wrong_type"]),
    Mutation("checkpoint names relative, no '..'", "kvc/artifact/checkpoint.py", r"raise KvcError\(f\"\{folder\}: the manifest names checkpoint file",
             [f"{A}::test_checkpoint_entry_reads_only_the_checkpoints_files"], after=r"def _member"),
    Mutation("checkpoint links stay inside the folder", "kvc/artifact/checkpoint.py", r"if not any\(real == r or r in real\.parents",
             [f"{A}::test_checkpoint_entry_reads_only_the_checkpoints_files", f"{A}::test_checkpoint_weights_linking_out_are_refused"]),
    Mutation("checkpoint names are the loader's files", "kvc/artifact/checkpoint.py", r"if set\(names\) != expected:",
             [f"{A}::test_checkpoint_entry_reads_only_the_checkpoints_files"]),
    # --- config
    Mutation("refuse YAML aliases (billion laughs)", "kvc/config/yaml_safe.py", r"if self\.check_event\(yaml\.AliasEvent\):",
             [f"{C}::test_yaml_aliases_are_refused_before_expanding", f"{BI}::test_billion_laughs_model_yaml"]),
    Mutation("bound YAML nesting", "kvc/config/yaml_safe.py", r"if self\._depth > MAX_DEPTH:", [f"{C}::test_nesting_is_bounded"]),
    Mutation("bound a config dict's nesting (a dict containing itself)", "kvc/config/yaml_safe.py",
             r"if depth > MAX_DEPTH:  # a dict that contains itself", [f"{C}::test_nesting_is_bounded"]),
    Mutation("cap model.yaml's size", "kvc/config/yaml_safe.py", r"if len\(data\) > limit:", [f"{C}::test_model_yaml_size_is_capped"]),
    Mutation("cap override length", "kvc/config/compose.py", r"if len\(s\) > MAX_OVERRIDE_CHARS:", [f"{C}::test_overrides_are_capped"]),
    Mutation("hardware numbers finite (gpu_mem_gb=inf)", "kvc/config/validate.py", r"if isinstance\(v, float\) and not math\.isfinite\(v\):",
             [f"{C}::test_numbers_must_be_finite_and_bounded", f"{BI}::test_non_finite_numbers"]),
    Mutation("solver_time_limit_s finite and positive", "kvc/config/validate.py", r"need\(math\.isfinite\(t\) and 0 < t",
             [f"{C}::test_numbers_must_be_finite_and_bounded", f"{BI}::test_non_finite_numbers"]),
    Mutation("workload sizes bounded", "kvc/config/validate.py", r"need\(1 <= v <= top, f\"workload",
             [f"{C}::test_numbers_must_be_finite_and_bounded"]),
    Mutation("a float field's huge int is one line", "kvc/config/validate.py", r"except OverflowError:",
             [f"{C}::test_numbers_must_be_finite_and_bounded", F], sub=(r"OverflowError", "ZeroDivisionError")),
    # --- command line, reports, profiles
    Mutation("check --device before loading", "kvc/cli/run.py", r"^\s+check_device\(args\.device\)$",
             [f"{BI}::test_bad_device"], after=r"def cmd_run"),
    Mutation("flush stdout inside main (closed pipe)", "kvc/cli/__init__.py", r"sys\.stdout\.flush\(\)  # a closed pipe",
             [f"{BI}::test_inspect_into_a_closed_pipe"]),
    Mutation("stdout to /dev/null after a closed pipe", "kvc/cli/__init__.py", r"os\.dup2\(devnull, sys\.stdout\.fileno\(\)\)",
             [f"{BI}::test_inspect_into_a_closed_pipe"]),
    Mutation("--trace folder errors are one line", "kvc/cli/bench.py", r"raise KvcError\(f\"--trace \{folder\}: cannot make",
             [f"{BI}::test_trace_onto_an_unwritable_place"], sub=(r"raise KvcError\(", "raise (lambda m: OSError(m))(")),
    Mutation("--trace folder must be writable", "kvc/cli/bench.py", r"if not os\.access\(folder, os\.W_OK",
             [f"{BI}::test_trace_onto_an_unwritable_place"]),
    Mutation("remove a trace's temporary", "kvc/reports/timeline.py", r"^\s+os\.unlink\(tmp\)$",
             [f"{BI}::test_trace_written_whole_or_not_at_all"]),
    Mutation("bound --search", "kvc/reports/plan.py", r"if not 1 <= max_batch <= top:", [f"{BI}::test_search_is_bounded"],
             sub=(r"if not 1 <= max_batch <= top:", "if max_batch < 1:")),
    Mutation("refuse kvc profile -o DIR", "kvc/profiler/resolve.py", r"if path\.is_dir\(\):",
             [f"{BI}::test_profile_output_leaves_nothing_behind"]),
    Mutation("remove a profile's temporary", "kvc/profiler/resolve.py", r"^\s+os\.unlink\(tmp\)$",
             [f"{BI}::test_profile_output_leaves_nothing_behind"]),
    Mutation("profile honours --no-progress", "kvc/cli/commands.py", r"hw = profile\(device, progress=is_enabled\(\)\)",
             [f"{BI}::test_profile_honours_no_progress"], sub=(r"is_enabled\(\)", "True")),
    Mutation("profiles read alias-free and type-checked", "kvc/profiler/resolve.py", r"return hardware_from_dict\(data, str\(path\)\)",
             [f"{BI}::test_profile_yaml_with_aliases_or_bad_values_is_refused"],
             sub=(r"hardware_from_dict\(data, str\(path\)\)", "HardwareConfig.from_dict(data)")),
]


def _files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def make_copy() -> Path:
    dst = Path(tempfile.mkdtemp(prefix="kvc-mutation-"))
    for f in _files():
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    for name in ("passes", "conf"):  # installed as kvc.passes / kvc.conf (pyproject's package-dir)
        (dst / "kvc" / name).symlink_to(Path("..") / name)
    return dst


def find_line(text: str, m: Mutation) -> int:
    """The 0-based index of the one line the mutation names."""
    lines = text.splitlines()
    start = 0
    if m.after:
        hits = [i for i, line in enumerate(lines) if re.search(m.after, line)]
        if len(hits) != 1:
            raise ValueError(f"anchor {m.after!r} matches {len(hits)} lines")
        start = hits[0]
    hits = [i for i, line in enumerate(lines) if i >= start and re.search(m.pattern, line)]
    if not m.after and len(hits) != 1:
        raise ValueError(f"pattern {m.pattern!r} matches {len(hits)} lines")
    if not hits:
        raise ValueError(f"pattern {m.pattern!r} matches no line after {m.after!r}")
    return hits[0]


def mutate(text: str, m: Mutation) -> tuple[str, int]:
    """The file with the mutation applied, and the (1-based) line it touched."""
    i = find_line(text, m)
    lines = text.splitlines(keepends=True)
    if m.sub:
        new = re.sub(m.sub[0], m.sub[1], lines[i], count=1)
        if new == lines[i]:
            raise ValueError(f"substitution {m.sub} changes nothing on line {i + 1}")
        lines[i] = new
    else:  # the innermost statement that starts on the line, all its lines, becomes `pass`
        stmts = [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.stmt)]
        starting = [n for n in stmts if n.lineno == i + 1]
        if starting:  # the smallest: `if x: raise` on one line is the if, not its body
            stmt = min(starting, key=lambda n: n.end_lineno - n.lineno)
        else:  # the line continues a statement begun above: the innermost one holding it
            stmt = max((n for n in stmts if n.lineno <= i + 1 <= n.end_lineno), key=lambda n: n.lineno)
        indent = re.match(r"\s*", lines[stmt.lineno - 1]).group(0)
        lines[stmt.lineno - 1: stmt.end_lineno] = [f"{indent}pass  # MUTATION\n"]
    out = "".join(lines)
    compile(out, m.file, "exec")
    return out, i + 1


def _limits():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_tests(copy: Path, tests: list[str], log: list | None = None) -> tuple[str, float]:
    """'' when every test passed, else the first failing test (or TIMEOUT); pytest's output
    is appended to `log` when one is given."""
    env = {**os.environ, "PYTHONPATH": str(copy) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-rfE", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-o", "addopts=", *tests]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=TIME_LIMIT_S,
                           preexec_fn=_limits, check=False)
    except subprocess.TimeoutExpired:
        return "TIMEOUT", time.perf_counter() - t0
    dt = time.perf_counter() - t0
    if log is not None:
        log.append(r.stdout + r.stderr)
    if r.returncode == 0:
        return "", dt
    failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", r.stdout, re.MULTILINE)
    if failed:
        return failed[0], dt
    tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
    return f"pytest exit {r.returncode}: {' | '.join(tail)[:200]}", dt


def check_copy(copy: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(copy)}
    where = subprocess.run([sys.executable, "-c", "import kvc, kvc.passes, kvc.conf; print(kvc.__file__)"],
                           cwd=copy, env=env, capture_output=True, text=True, check=True).stdout.strip()
    if not where.startswith(str(copy)):
        raise SystemExit(f"the copy's kvc is not the one imported ({where}); cannot mutate it")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--only", type=int, nargs="*", help="mutation ids to run")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
    ap.add_argument("--no-baseline", action="store_true", help="skip running the tests unmutated first")
    args = ap.parse_args(argv)
    chosen = [(k, m) for k, m in enumerate(MUTATIONS, 1) if not args.only or k in args.only]
    if args.list:
        for k, m in chosen:
            print(f"{k:>3}  {m.file}: {m.what}  [{', '.join(t.split('::')[-1] for t in m.tests)}]")
        return 0
    copy = make_copy()
    rows = []
    try:
        check_copy(copy)
        if not args.no_baseline:
            tests = sorted({t for _, m in chosen for t in m.tests})
            log: list[str] = []
            failed, dt = run_tests(copy, tests, log)
            print(f"baseline: {len(tests)} test selections unmutated: {failed or 'all pass'} ({dt:.0f} s)",
                  flush=True)
            if failed:
                print("\n".join(("".join(log)).splitlines()[-60:]), file=sys.stderr)
                print("the tests fail without any mutation: fix that first", file=sys.stderr)
                return 1
        for k, m in chosen:
            path = copy / m.file
            original = path.read_text()
            try:
                text, line = mutate(original, m)
            except (ValueError, SyntaxError) as e:
                rows.append((k, m, "?", f"BAD MUTATION: {e}", 0.0))
                print(f"[{k}] {m.what}: bad mutation: {e}", flush=True)
                continue
            path.write_text(text)
            try:
                caught, dt = run_tests(copy, m.tests)
            finally:
                path.write_text(original)
            rows.append((k, m, line, caught or "NONE", dt))
            print(f"[{k}/{len(MUTATIONS)}] {m.what}: {caught or 'NONE'} ({dt:.0f} s)", flush=True)
    finally:
        if args.keep:
            print(f"copy kept at {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)
    print()
    print("| # | line removed or changed | file:line | first test that failed |")
    print("|---|---|---|---|")
    for k, m, line, caught, _ in rows:
        print(f"| {k} | {m.what} | {m.file}:{line} | {caught} |")
    missed = [k for k, _, _, caught, _ in rows if caught == "NONE" or caught.startswith("BAD")]
    print(f"\n{len(rows) - len(missed)} of {len(rows)} mutations caught"
          + (f"; not caught: {missed}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

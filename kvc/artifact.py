"""The compiled artifact: a folder with `manifest.json` and `graph.py`.

This module writes and reads the folder and checks what it names; loading (kvc.api.load)
never executes or unpickles anything from it: it rebuilds the model from the resolved config
in the manifest (dummy weights from their seed, or the referenced checkpoint after
`check_weights` compared each file's sha256), re-runs trace + passes with the stored Plan,
and refuses the artifact if the regenerated code's hash differs from the recorded one.

Writing. The files go to a temporary sibling folder (`.NAME.kvc-tmp.HOST.PID.XXXX`), which is
then put in place in one step: renamed to the name if nothing is there, or exchanged with
the artifact already there (Linux `renameat2(RENAME_EXCHANGE)`, macOS `renamex_np(RENAME_SWAP)`),
so at every moment the name holds the old artifact or the new one, whole. Where the OS or
the filesystem cannot exchange, the old artifact is renamed aside (`.NAME.kvc-old.HOST.PID.XXXX`)
and put back if the second rename does not happen. Only a folder that is verifiably a kvc
artifact is ever replaced: its manifest names kvc's format and it holds nothing kvc did not
write. An interrupted write (Ctrl-C anywhere) removes its temporary folder; one killed
outright (SIGKILL, power) leaves it, and the next compile to that name removes it (or puts an
old artifact back), once the process that made it is gone.

Reading. manifest.json and graph.py must be regular files in the folder (never symbolic
links), no larger than MAX_MANIFEST_BYTES / MAX_GRAPH_BYTES, and every manifest field has its
type and its bounds (kvc.config.LIMITS) checked before anything is built from it. A checkpoint
is read only through the files its loader would read, named relative to its folder.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path, PurePosixPath

import torch

from kvc.config import LIMITS, from_dict, hardware_from_dict
from kvc.errors import KvcError
from kvc.ir.modes import NAMES as MODE_NAMES
from kvc.ir.plan import Plan
from kvc.version import __version__

FORMAT = "kvc-artifact"  # what a manifest names itself; one without it is read as version 1
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH = "graph.py"
FILES = (MANIFEST, GRAPH)  # everything an artifact folder holds
MAX_MANIFEST_BYTES = 16 << 20
MAX_GRAPH_BYTES = 64 << 20
MAX_CHECKPOINT_FILES = 100_000
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TRIES = 16  # placing attempts when other compiles keep changing the name under us


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- checkpoints


def _member(folder: Path, name: str, real_root: Path | None = None) -> Path:
    """`folder/name` for a name the manifest gives: relative, no `..`, and (symbolic links
    followed) still inside the folder, or inside the model's `blobs/` when the folder is a
    Hugging Face cache snapshot (`.../models--X/snapshots/REV`, whose files link there)."""
    if (not isinstance(name, str) or not name or "\x00" in name or "\\" in name
            or PurePosixPath(name).is_absolute() or any(part in ("..", ".", "") for part in name.split("/"))):
        raise KvcError(f"{folder}: the manifest names checkpoint file {name!r}; expected a path "
                       "relative to the checkpoint folder, without '..'")
    root = real_root or Path(os.path.realpath(folder))
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    real = Path(os.path.realpath(folder / name))
    if not any(real == r or r in real.parents for r in roots):
        raise KvcError(f"{folder / name}: leads out of the checkpoint folder (to {real}); kvc "
                       "reads only files inside it")
    return folder / name


def _weights_entry(r) -> dict:
    m = r.config.model
    if m.checkpoint is None:
        return {"kind": "dummy", "preset": m.preset, "seed": m.seed}
    from kvc.models import checkpoint_files

    folder = Path(m.checkpoint).resolve()
    files = {}
    for p in [*checkpoint_files(folder), folder / "config.json"]:
        try:
            name = p.relative_to(folder).as_posix()
        except ValueError:
            raise KvcError(f"{folder}: names weight file {str(p)!r}, outside the folder") from None
        files[name] = sha256_file(_member(folder, name))
    return {"kind": "checkpoint", "path": str(folder), "sha256": files}


def check_weights(entry: dict) -> str | None:
    """The checkpoint folder to load, after checking every file against its recorded hash.
    The names must be exactly the files the checkpoint loader reads (config.json and the
    weight files of kvc.models.checkpoint_files), each inside the folder."""
    _check_weights_entry(entry, "manifest")
    if entry["kind"] == "dummy":
        return None
    from kvc.models import checkpoint_files

    folder = Path(entry["path"])
    if not folder.is_dir():
        raise KvcError(f"{folder}: checkpoint folder missing; the artifact references it")
    root = Path(os.path.realpath(folder))
    names = entry["sha256"]
    for name in names:  # before listing the folder: a name out of it is refused as such
        _member(folder, name, root)
    expected = {p.relative_to(folder).as_posix() for p in checkpoint_files(folder)} | {"config.json"}
    if set(names) != expected:
        odd = sorted(set(names) ^ expected)
        raise KvcError(f"{folder}: the artifact's checkpoint files differ from the folder's "
                       f"({', '.join(odd[:3])}{', ...' if len(odd) > 3 else ''}); recompile")
    for name, digest in names.items():
        f = _member(folder, name, root)
        if not f.is_file():
            raise KvcError(f"{f}: checkpoint file missing; the artifact references it")
        if sha256_file(f) != digest:
            raise KvcError(f"{f}: checkpoint file changed since compile (sha256 differs); recompile")
    return str(folder)


# --------------------------------------------------------------------------- writing


def _manifest(r, plan: Plan, lowered, graph_text: str) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kvc_version": __version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": r.config.to_dict(),
        "model_spec": r.spec.to_dict(),
        "hardware": asdict(r.hardware),
        "plan": plan.to_json(),
        "code_hash": lowered.code_hash,
        "graph_sha256": hashlib.sha256(graph_text.encode()).hexdigest(),
        "weights": _weights_entry(r),
    }


def write_artifact(out: Path, r, plan: Plan, lowered) -> Path:
    """Write the artifact folder `out`, replacing a kvc artifact already there in one step
    (see the module docstring); anything else at `out` is refused, left as it is."""
    out = _target(out)
    graph_text = f'"""Generated by kvc {__version__}; for reading only, never executed."""\n\n' \
                 + lowered.code
    manifest = _manifest(r, plan, lowered, graph_text)
    tmp = None
    try:
        _check_replaceable(out, missing_ok=True)  # refuse before any temporary exists
        out.parent.mkdir(parents=True, exist_ok=True)
        _recover_leftovers(out)
        with _signals_deferred():
            tmp = _make_temp(out)
        _write_file(tmp / GRAPH, graph_text.encode())
        _write_file(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        _fsync(tmp)
        with _signals_deferred():  # a Ctrl-C here lands once the name holds one whole artifact
            try:
                _place(tmp, out)  # after it, `tmp` is gone or holds the artifact it replaced
                _fsync(out.parent)
            finally:
                _remove_tree(tmp)
            tmp = None
    except OSError as e:
        name = str(e.filename or "")
        shown = f" ({name})" if name and name != str(out) and (tmp is None or str(tmp) not in name) else ""
        raise KvcError(f"cannot write the artifact {out}: {e.strerror or e}{shown}") from None
    finally:  # Ctrl-C included: no temporary left behind
        if tmp is not None:
            with _signals_deferred():
                _remove_tree(tmp)
    return out


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT, SIGTERM and SIGHUP held back while the name changes hands and temporaries are
    removed, and acted on as soon as that is done: a second Ctrl-C during the clean-up of a
    first would otherwise leave a temporary behind. The handlers are swapped, not the signal
    mask: a process-wide signal reaches whichever thread does not block it (torch's pools),
    and Python runs its handlers in the main thread only, so other threads run as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    before = {}
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            with contextlib.suppress(ValueError, OSError):
                before[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):  # each once, in the order they came
            handler = before[sig]
            if callable(handler):
                handler(sig, None)  # Python's own SIGINT handler raises KeyboardInterrupt here
            elif handler == signal.SIG_DFL:
                signal.raise_signal(sig)  # what the signal would have done (SIGTERM: exit)


def _target(out) -> Path:
    """`out` as an absolute path, refused where replacing it cannot be right."""
    out = Path(os.path.abspath(out))
    try:
        cwd = Path(os.path.realpath(os.getcwd()))
    except OSError:
        cwd = None
    real = Path(os.path.realpath(out))
    if not out.name or (cwd is not None and (real == cwd or real in cwd.parents)):
        raise KvcError(f"-o {out}: the current folder or one above it; an artifact is a folder "
                       "of its own: give a new name, e.g. -o model.kvc")
    return out


def _tag() -> str:
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
    return f"{host}.{os.getpid()}"


def _make_temp(out: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.kvc-tmp.{_tag()}.", dir=out.parent))
    with contextlib.suppress(OSError):  # mkdtemp's 0700 would keep the artifact from others
        os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(folder: Path) -> None:
    """The folder's entries on disk (the renames that follow then publish whole files)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _check_replaceable(out: Path, missing_ok: bool = False) -> None:
    """KvcError unless `out` is a kvc artifact folder (its manifest names kvc's format and
    it holds only kvc's files); FileNotFoundError (or nothing, `missing_ok`) when absent."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        if missing_ok:
            return
        raise

    def refuse(why: str):
        raise KvcError(f"{out} exists and is not a kvc artifact ({why}); kvc replaces only an "
                       "artifact folder it wrote: choose another -o folder")

    if stat.S_ISLNK(st.st_mode):
        refuse("a symbolic link")
    if not stat.S_ISDIR(st.st_mode):
        refuse("not a folder")
    other = sorted(set(os.listdir(out)) - set(FILES))
    if other:
        refuse(f"it holds {', '.join(other[:3])}{', ...' if len(other) > 3 else ''}")
    try:
        m = json.loads(_read_member(out, MANIFEST, MAX_MANIFEST_BYTES))
    except FileNotFoundError:
        if not os.path.lexists(out):
            raise  # moved away meanwhile (another compile): the caller tries again
        refuse(f"no {MANIFEST}")
    except KvcError as e:
        refuse(str(e).split(": ", 1)[-1])
    except (ValueError, RecursionError):
        refuse(f"{MANIFEST} is not JSON")
    if not isinstance(m, dict) or not (m.get("format") == FORMAT or (
            "format" not in m and m.get("format_version") == 1 and "kvc_version" in m)):
        refuse(f"{MANIFEST} does not name kvc's format")


def _place(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out` in one step; see the module docstring."""
    for _ in range(_TRIES):
        try:
            if not os.path.lexists(out):
                _rename_new(tmp, out)
                return
        except OSError as e:  # another compile got there first: replace its artifact
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        try:
            _check_replaceable(out)
            if _exchange(tmp, out):
                return  # `tmp` holds the replaced artifact now; the caller removes it
            _two_renames(tmp, out)
            return
        except FileNotFoundError:
            continue  # another compile moved it away meanwhile: try again
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    raise KvcError(f"cannot write the artifact {out}: other processes kept replacing it "
                   f"({_TRIES} tries); compile to it again when they are done")


def _two_renames(tmp: Path, out: Path) -> None:
    """Without an atomic exchange: the old artifact aside, the new one in, the old one
    removed; the old one is put back if the second rename does not happen."""
    old = tmp.with_name(tmp.name.replace(".kvc-tmp.", ".kvc-old.", 1))
    try:
        os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        if os.path.lexists(old) and not os.path.lexists(out):
            os.rename(old, out)
        _remove_tree(old)  # the name holds another compile's artifact: ours is not needed
        raise
    _remove_tree(old)


def _recover_leftovers(out: Path) -> None:
    """Temporary folders of compiles to `out` that were killed (their process is gone, on
    this host): an old artifact moved aside goes back if the name is empty; the rest goes."""
    pat = re.compile(re.escape(f".{out.name}.kvc-") + r"(tmp|old)\.([A-Za-z0-9-]+)\.(\d+)\.[A-Za-z0-9_]+")
    host = _tag().split(".")[0]
    try:
        names = os.listdir(out.parent)
    except OSError:
        return
    for name in sorted(names, key=lambda n: ".kvc-old." not in n):  # old ones first
        m = pat.fullmatch(name)
        if not m or m.group(2) != host or _alive(int(m.group(3))):
            continue
        p = out.parent / name
        if m.group(1) == "old" and not os.path.lexists(out):
            with contextlib.suppress(OSError):
                os.rename(p, out)
                continue
        _remove_tree(p)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, someone else's
    return True


# renameat2 / renamex_np through ctypes; None where this OS has neither

_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # Linux
_RENAME_SWAP, _RENAME_EXCL = 2, 4  # macOS renamex_np
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, getattr(errno, "ENOTSUP", -1), getattr(errno, "EOPNOTSUPP", -1))
_rename_fn = "unset"


def _renamer():
    global _rename_fn
    if _rename_fn == "unset":
        _rename_fn = None
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
                f = libc.renameat2
                f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                _rename_fn = ("linux", f)
            elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
                f = libc.renamex_np
                f.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
                _rename_fn = ("darwin", f)
    return _rename_fn


def _rename2(src: Path, dst: Path, linux_flag: int, mac_flag: int) -> bool:
    """One renameat2/renamex_np call: True when done, False when unsupported here; OSError."""
    fn = _renamer()
    if fn is None:
        return False
    kind, f = fn
    a, b = os.fsencode(src), os.fsencode(dst)
    rc = f(_AT_FDCWD, a, _AT_FDCWD, b, linux_flag) if kind == "linux" else f(a, b, mac_flag)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _exchange(tmp: Path, out: Path) -> bool:
    """Swap the two folders' names atomically; False where the OS or filesystem cannot."""
    return _rename2(tmp, out, _RENAME_EXCHANGE, _RENAME_SWAP)


def _rename_new(tmp: Path, out: Path) -> None:
    """Rename to a name nothing holds (EEXIST if something does, even an empty folder)."""
    if not _rename2(tmp, out, _RENAME_NOREPLACE, _RENAME_EXCL):
        os.rename(tmp, out)


# --------------------------------------------------------------------------- reading


def _read_member(folder: Path, name: str, limit: int) -> bytes:
    """A regular file directly in `folder`, never through a symbolic link, at most `limit`
    bytes, its size checked before reading (FileNotFoundError when absent)."""
    path = folder / name
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP or os.path.islink(path):
            raise KvcError(f"{path}: a symbolic link; an artifact's files must be regular files "
                           "inside it") from None
        raise KvcError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KvcError(f"{path}: not a regular file; an artifact's files must be regular files")
        if st.st_size > limit:
            raise KvcError(f"{path}: {st.st_size} bytes, more than an artifact's {name} may be "
                           f"({limit >> 20} MiB)")
        chunks, n = [], 0
        while n <= limit:
            b = os.read(fd, min(1 << 20, limit + 1 - n))
            if not b:
                break
            chunks.append(b)
            n += len(b)
        if n > limit:
            raise KvcError(f"{path}: more than {limit >> 20} MiB; not an artifact's {name}")
        return b"".join(chunks)
    finally:
        os.close(fd)


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


def _int(v, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


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
    for key, lo, hi in (("prompt_len", 1, ctx), ("gen_len", 0, ctx), ("chunk_tokens", 1, LIMITS["chunk_tokens"]),
                        ("lookahead", 0, 8), ("act_chunks", 1, LIMITS["act_chunks"]),
                        ("batch_size", 0, LIMITS["batch_size"])):
        if key in d or key in ("prompt_len", "gen_len", "chunk_tokens"):
            need(_int(d.get(key), lo, hi), f"plan.{key} = {str(d.get(key))[:40]}; expected an integer {lo}..{hi}")
    p, g = d["prompt_len"], d["gen_len"]
    need(p + g <= ctx, "plan: prompt_len + gen_len out of range")
    need(p == cfg.workload.prompt_len and g == cfg.workload.gen_len,
         "plan's prompt_len/gen_len differ from the config's workload")
    r = d.get("resident")
    need(isinstance(r, list) and len(r) == units and all(type(x) is bool for x in r),
         f"plan.resident is not {units} true/false flags")
    rows = d.get("recompute", [])
    need(isinstance(rows, list) and len(rows) <= g + 1, "plan.recompute has more rows than contexts")
    for row in rows:
        need(isinstance(row, list) and len(row) == units and all(_int(x, 0, p + g) for x in row),
             f"plan.recompute rows must hold {units} token counts 0..{p + g}")
    f = d.get("forced_fraction")
    need(f is None or _num(f, 0.0, 1.0), "plan.forced_fraction is not null or 0..1")
    need(f is not None or all(r) or len(rows) == g + 1,
         f"plan.recompute has {len(rows)} rows; its contexts {p}..{p + g} need {g + 1}")
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


def _check_weights_entry(w, where: str) -> None:
    def need(ok, what: str):
        if not ok:
            raise KvcError(f"{where}: damaged manifest ({what}); recompile the artifact")

    need(isinstance(w, dict), "weights is not an object")
    kind = w.get("kind")
    if kind == "dummy":
        need(w.get("preset") is None or isinstance(w.get("preset"), str), "weights.preset is not a string")
        need(_int(w.get("seed", 0), 0, LIMITS["seed"]), "weights.seed is not an integer seed")
        return
    need(kind == "checkpoint", f"weights.kind {str(kind)[:40]!r} is neither 'dummy' nor 'checkpoint'")
    need(isinstance(w.get("path"), str) and os.path.isabs(w["path"]) and "\x00" not in w["path"],
         "weights.path is not an absolute folder path")
    files = w.get("sha256")
    need(isinstance(files, dict) and 0 < len(files) <= MAX_CHECKPOINT_FILES,
         "weights.sha256 is not an object of file hashes")
    for name, digest in files.items():
        need(isinstance(digest, str) and _HEX64.fullmatch(digest), f"weights.sha256[{name[:60]!r}] "
                                                                   "is not a sha256 hex digest")
        _member(Path(w["path"]), name)

"""Putting a finished temporary folder at an artifact's name in one step (see kvc.artifact):
renamed to the name if nothing is there, or exchanged with the kvc artifact already there
(`renameat2(RENAME_EXCHANGE)` / `renamex_np(RENAME_SWAP)`), else two renames with the old one
put back on failure; and the recovery of a killed compile's leftovers."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import stat
import sys
from pathlib import Path

from kvc.artifact.folder import FILES, FORMAT, MANIFEST, MAX_MANIFEST_BYTES, _read_member
from kvc.errors import KvcError

_TRIES = 16  # placing attempts when other compiles keep changing the name under us


def _tag() -> str:
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
    return f"{host}.{os.getpid()}"


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
    try:
        other = sorted(set(os.listdir(out)) - set(FILES))
    except FileNotFoundError:  # moved away since the lstat (another compile): as if absent
        if missing_ok:
            return
        raise
    if other:
        refuse(f"it holds {', '.join(other[:3])}{', ...' if len(other) > 3 else ''}")
    try:
        m = json.loads(_read_member(out, MANIFEST, MAX_MANIFEST_BYTES))
    except FileNotFoundError:
        if _replaced_since(out, st):  # moved away meanwhile (another compile), maybe replaced
            if missing_ok:
                return
            raise  # the caller tries again
        refuse(f"no {MANIFEST}")
    except KvcError as e:
        refuse(str(e).split(": ", 1)[-1])
    except (ValueError, RecursionError):
        refuse(f"{MANIFEST} is not JSON")
    if not isinstance(m, dict) or not (m.get("format") == FORMAT or (
            "format" not in m and m.get("format_version") == 1 and "kvc_version" in m)):
        refuse(f"{MANIFEST} does not name kvc's format")


def _replaced_since(out: Path, st: os.stat_result) -> bool:
    """Whether `out` no longer names the folder `st` described (gone, or another one)."""
    try:
        now = os.lstat(out)
    except FileNotFoundError:
        return True
    return (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev)


def _place(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out` in one step; see kvc.artifact."""
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

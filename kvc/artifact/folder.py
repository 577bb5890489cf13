"""What an artifact folder holds, and how one of its files is read: a regular file directly
in the folder (never through a symbolic link), its size checked before reading."""
from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from pathlib import Path

from kvc.errors import KvcError

FORMAT = "kvc-artifact"  # what a manifest names itself; one without it is read as version 1
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH = "graph.py"
FILES = (MANIFEST, GRAPH)  # everything an artifact folder holds
MAX_MANIFEST_BYTES = 16 << 20
MAX_GRAPH_BYTES = 64 << 20
MAX_CHECKPOINT_FILES = 100_000
_HEX64 = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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

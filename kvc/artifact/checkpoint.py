"""The checkpoint an artifact names: its weights entry (each file's sha256), the check of
that entry's shape, and of the files against it before loading. A checkpoint is read only
through the files its loader would read, named relative to its folder."""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from kvc.artifact.folder import _HEX64, MAX_CHECKPOINT_FILES, sha256_file
from kvc.config import LIMITS
from kvc.errors import KvcError


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


def _int(v, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


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

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

from kvc.artifact.checkpoint import check_weights
from kvc.artifact.folder import (
    FILES,
    FORMAT,
    FORMAT_VERSION,
    GRAPH,
    MANIFEST,
    MAX_CHECKPOINT_FILES,
    MAX_GRAPH_BYTES,
    MAX_MANIFEST_BYTES,
    sha256_file,
)
from kvc.artifact.read import read_manifest, validate_manifest
from kvc.artifact.write import write_artifact

__all__ = ["FILES", "FORMAT", "FORMAT_VERSION", "GRAPH", "MANIFEST", "MAX_CHECKPOINT_FILES",
           "MAX_GRAPH_BYTES", "MAX_MANIFEST_BYTES", "check_weights", "read_manifest",
           "sha256_file", "validate_manifest", "write_artifact"]

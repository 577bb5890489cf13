"""Reading YAML safely: a size-capped text read, and a loader without aliases and with a
depth bound; every error is one line."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kvc.config.schema import MAX_DEPTH
from kvc.errors import KvcError


def read_text_capped(path, limit: int, what: str) -> str:
    """A UTF-8 text file of at most `limit` bytes, read without reading more (a FIFO or
    /dev/zero included: the read stops at limit + 1); one-line KvcErrors otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise KvcError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(data) > limit:
        raise KvcError(f"{path}: larger than {limit // 1024} KiB; {what} is a small text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KvcError(f"{path}: not UTF-8 text (byte {e.start}); expected a YAML file") from None


class _Refused(yaml.composer.ComposerError):
    """Well-formed YAML that kvc will not compose (an alias, too deep)."""


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader without aliases and with a depth bound: a `*name` may stand for a
    subtree any number of times, so a few hundred bytes of nested aliases expand to billions
    of nodes (a "billion laughs"); refusing them while composing costs nothing before."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(
                None, None, f"YAML aliases (*{event.anchor}) are not supported in kvc's "
                "files; write the value out", event.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml(text: str, where: str) -> Any:
    """YAML text -> plain data, through the alias-free loader; errors are one line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        what = "" if isinstance(e, _Refused) else " YAML syntax error"
        raise KvcError(f"{where}:{what}{at}: {problem}".replace(": at line", ", line")) from None
    except RecursionError:  # the scanner's own recursion, before the composer's bound
        raise KvcError(f"{where}: nested deeper than {MAX_DEPTH} levels") from None


def _plain(d: Any, where: str = "config", depth: int = 0) -> Any:
    if depth > MAX_DEPTH:  # a dict that contains itself ends here too
        raise KvcError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(d, dict):
        return {str(k): _plain(v, where, depth + 1) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_plain(v, where, depth + 1) for v in d]
    return d

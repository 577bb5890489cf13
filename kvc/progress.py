"""Progress bars for the long steps (weight loading, compiling, pool allocation, generation).

Off unless switched on: the Python API stays quiet by default, and the CLI wraps each command
in `enabled(True)`. Even then a bar only draws when stderr is a terminal, so logs and pipes
never fill with carriage returns. tqdm draws it when importable; otherwise a one-line text bar.

Hot loops call `bar.update()`, which is a counter increment plus, when drawing, a redraw at
most every `REDRAW_S` seconds; a disabled bar is a no-op object.
"""
from __future__ import annotations

import contextlib
import sys
import time

REDRAW_S = 0.1
_ENABLED = False


@contextlib.contextmanager
def enabled(on: bool = True):
    """Bars drawn (on a terminal) inside this block; the previous setting comes back after."""
    global _ENABLED
    before, _ENABLED = _ENABLED, on
    try:
        yield
    finally:
        _ENABLED = before


def is_enabled() -> bool:
    return _ENABLED and sys.stderr.isatty()


class _Quiet:
    """What `bar` returns when nothing is drawn: same verbs, no work."""

    n = 0

    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _TextBar(_Quiet):
    WIDTH = 24

    def __init__(self, desc: str, total: int | None, unit: str):
        self.desc, self.total, self.unit = desc, total, unit
        self.n, self._t0, self._last = 0, time.perf_counter(), 0.0
        self._draw()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self._last >= REDRAW_S:
            self._last = now
            self._draw()

    def set_description(self, desc: str) -> None:
        self.desc = desc
        self._draw()

    def _draw(self, end: str = "") -> None:
        dt = time.perf_counter() - self._t0
        if self.total:
            k = self.WIDTH * min(self.n, self.total) // self.total
            body = f"[{'#' * k}{'.' * (self.WIDTH - k)}] {self.n}/{self.total}"
        else:
            body = f"{self.n} {self.unit}"
        rate = f" {self.n / dt:.1f} {self.unit}/s" if dt > 0 and self.n else ""
        sys.stderr.write(f"\r{self.desc} {body}{rate} {dt:.1f}s\x1b[K{end}")
        sys.stderr.flush()

    def close(self) -> None:
        self._draw(end="\n")


def bar(desc: str, total: int | None = None, unit: str = "it"):
    """A progress bar for `total` steps (None: a counter), or a no-op when disabled."""
    if not is_enabled():
        return _Quiet()
    try:
        from tqdm import tqdm
    except ImportError:
        return _TextBar(desc, total, unit)
    return tqdm(desc=desc, total=total, unit=unit, file=sys.stderr, leave=True,
                mininterval=REDRAW_S, dynamic_ncols=True)

"""What a long compile shows while it works.

Phase lines (`[  12.3s] passes (llvm)`) go to stderr unless quiet. On a
terminal, long phases also get a live line redrawn in place: a bar for work
with a known count (weights, quality-check windows) and an elapsed-time
spinner for opaque calls (codegen: one call into TVM/LLVM). In a pipe or CI
log the live lines never appear, so logs hold only the phase lines.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator


SPINNER = "|/-\\"


class Progress:
    """`progress(msg)` prints a phase line; `count` and `waiting` draw live lines on a TTY."""

    def __init__(self, quiet: bool = False, stream=None, live: bool | None = None):
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        if live is None:
            live = not quiet and _is_tty(self.stream) and os.environ.get("TERM") != "dumb" and "CI" not in os.environ
        self.live = live
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._drawn = False

    def __call__(self, msg: str) -> None:
        if self.quiet:
            return
        with self._lock:
            self._clear()
            self.stream.write(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}\n")
            self.stream.flush()

    def live_only(self) -> "Progress":
        """The same live lines, without phase lines (for nested work)."""
        return Progress(quiet=True, stream=self.stream, live=self.live)

    def count(self, what: str, done: int, total: int) -> None:
        """`done` of `total` units of `what` finished (a bar on a TTY; nothing elsewhere)."""
        if not self.live or total <= 0:
            return
        width = 28
        fill = width * done // total
        self._draw(f"  {what} [{'#' * fill}{'.' * (width - fill)}] {done}/{total}")
        if done >= total:
            with self._lock:
                self._clear()

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """An opaque call: a spinner with the elapsed time, redrawn twice a second on a TTY."""
        if not self.live:
            yield
            return
        stop = threading.Event()
        start = time.perf_counter()

        def spin() -> None:
            i = 0
            while not stop.wait(0.5):
                self._draw(f"  {what} {SPINNER[i % 4]} {time.perf_counter() - start:5.0f}s")
                i += 1

        th = threading.Thread(target=spin, daemon=True)
        th.start()
        try:
            yield
        finally:
            stop.set()
            th.join()
            with self._lock:
                self._clear()

    def _draw(self, line: str) -> None:
        with self._lock:
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
            self._drawn = True

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self._drawn = False


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


QUIET = Progress(quiet=True)

"""SIGTERM and Ctrl-C as exceptions, so that a stopped command unwinds and removes what it was writing (a
temp file, a half-copied blob), and sections that no signal may cut in two.

The CLI installs the handlers (`install`); a library caller keeps its own. Inside `deferred()` — the commit of
a registry entry: its folder of links and its row — a signal is held until the section ends, so the entry is
committed whole or not at all; the command then stops.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(BaseException):
    """SIGTERM, raised where the process is (like `KeyboardInterrupt` for Ctrl-C), so that cleanup runs."""


_held: list[int] = []
_depth = 0


def _stop(signum: int, frame: object) -> None:
    if _depth:
        _held.append(signum)
        return
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def install() -> None:
    """Turn SIGTERM and SIGINT into exceptions in this (main-thread) process."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGTERM / SIGINT (when `install`ed) until the block ends, then stop."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _held:
            signum = _held[0]
            _held.clear()
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

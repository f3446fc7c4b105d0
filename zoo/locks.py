"""Waiting on a lock another process holds: say so after a second, give up with a hint after a minute.

The hint never suggests deleting a lock file: the kernel drops every lock the zoo takes when its holder exits,
and deleting a lock a live writer holds lets a second writer in beside it (a committed entry is lost).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from zoo.errors import ZooError

NOTICE_AFTER_S = 1.0
TIMEOUT_S = 60.0


def wait_for(acquire: Callable[[float], bool], what: str, timeout: float = TIMEOUT_S) -> None:
    """Call `acquire(seconds)` (True once the lock is held); after NOTICE_AFTER_S say on stderr that we wait for
    `what`; after `timeout` raise a one-line `ZooError`."""
    if acquire(min(NOTICE_AFTER_S, timeout)):
        return
    print(f"waiting for {what} (another zoo process holds it)…", file=sys.stderr, flush=True)
    if not acquire(max(timeout - NOTICE_AFTER_S, 0.0)):
        raise ZooError(
            f"{what} is still held by another process after {timeout:.0f} s",
            "retry once that zoo process has finished (the lock is released the moment it exits, even if it is killed)",
        )

"""Make a child process end when the process that started it is gone.

medfed's daemons start Flower processes in their own sessions (so a stop reaches
everything they spawn). If a daemon is killed outright, this watcher in the child
notices the new parent and ends the child's whole process group.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

# Set by a process that starts medfed daemons it must not leave behind (demo, tests).
EXIT_WITH_PARENT_ENV = "MEDFED_EXIT_WITH_PARENT"


def watch_parent(interval: float = 0.5) -> threading.Thread:
    """Start a daemon thread that SIGTERMs this process group once the parent changes."""
    parent = os.getppid()

    def _watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os.killpg(os.getpgid(0), signal.SIGTERM)
                return

    thread = threading.Thread(target=_watch, name="medfed-parent-watch", daemon=True)
    thread.start()
    return thread


def exit_with_parent(grace: float = 5.0, interval: float = 0.5) -> threading.Thread:
    """Start a daemon thread that ends this process once its parent is gone.

    First SIGTERM (the process's own handlers get ``grace`` seconds to finish), then
    ``os._exit``: a process whose handlers wait for a parent that is gone must not stay
    behind. Only for a process whose durable state is on disk at every moment it could
    be cut (the ServerApp: a run resumes from its last saved round).
    """
    parent = os.getppid()
    return exit_when(lambda: os.getppid() == parent, grace=grace, interval=interval)


def exit_when(
    alive: Callable[[], bool], *, grace: float = 5.0, interval: float = 0.5
) -> threading.Thread:
    """Start a daemon thread that ends this process once ``alive()`` turns false.

    SIGTERM first, then ``os._exit(3)`` ``grace`` seconds later (see :func:`exit_with_parent`).
    """

    def _watch() -> None:
        while alive():
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(3)

    thread = threading.Thread(target=_watch, name="medfed-exit-with-parent", daemon=True)
    thread.start()
    return thread

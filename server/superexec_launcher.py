"""Run Flower's SuperExec so that each run's ServerApp starts in a warm spare process.

The SuperLink starts this in place of ``flower-superexec`` (same arguments; see
:func:`medfed.server.superlink_launcher.launch_superexec_with_spares`). Flower's
subprocess executor builds the ``flwr-serverapp`` command for a run as it always does;
here that command's arguments go to a spare ServerApp process waiting in the folder
named by ``MEDFED_SERVERAPP_SPARES`` (:mod:`medfed.server.serverapp_spare`). Without a
spare that takes it, the command runs as Flower would run it.

Usage: ``python -m medfed.server.superexec_launcher [flower-superexec args]``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from medfed.core.heap import with_model_buffers
from medfed.server.serverapp_spare import SPARES_ENV, hand_over

log = logging.getLogger("flwr")

SERVERAPP_COMMAND = "flwr-serverapp"


class SpareFirst:
    """Stands in for the ``subprocess`` module inside Flower's subprocess executor."""

    DEVNULL = subprocess.DEVNULL

    def __init__(self, spares: str | None) -> None:
        self.spares = spares
        self.handed_over = 0

    def Popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes] | None:  # noqa: N802
        """Hand a ServerApp's arguments to a spare; run anything else as Flower would."""
        if not args or args[0] != SERVERAPP_COMMAND or not self.spares:
            return subprocess.Popen(args, **kwargs)
        if hand_over(self.spares, list(args[1:])):
            self.handed_over += 1
            return None
        log.warning("medfed: no spare ServerApp took the run; starting %s", SERVERAPP_COMMAND)
        env = kwargs.pop("env", None)
        return subprocess.Popen(
            args, env=with_model_buffers(os.environ if env is None else env), **kwargs
        )


def use_spares() -> bool:
    """Route Flower's ServerApp launches through spares (False if Flower changed)."""
    from flwr.supercore.superexec.executor import subprocess_executor

    if getattr(subprocess_executor, "subprocess", None) is not subprocess:
        log.warning("medfed: Flower's subprocess executor changed; each ServerApp starts cold")
        return False
    subprocess_executor.subprocess = SpareFirst(os.environ.get(SPARES_ENV))  # type: ignore[assignment]
    return True


def main() -> int:
    """Install the spare hand-over and run the stock flower-superexec."""
    use_spares()
    from flwr.supercore.cli import flower_superexec

    sys.argv[0] = "flower-superexec"
    return int(flower_superexec() or 0)


if __name__ == "__main__":
    sys.exit(main())

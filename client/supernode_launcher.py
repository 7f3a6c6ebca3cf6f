"""Run Flower's SuperNode with shorter idle polls than its hard-coded 3 seconds.

Flower 1.42's SuperNode sleeps 3 s whenever a poll of the SuperLink finds no
message (the ``time.sleep(3)`` in ``flwr/supernode/start_client_internal.py``),
and 0.5 s between checks for the ClientApp's reply; each round pays these twice
(train, evaluate). This launcher polls every ``MEDFED_POLL_INTERVAL`` seconds while
the site is busy and backs off to Flower's 3 s once it has been idle a while
(:class:`medfed.core.idle_backoff.IdleBackoff`), caps the other sleeps at that
interval, then runs the stock ``flower-supernode`` entry point unchanged.

A message of a run that ended while it was being received no longer leaves a task
that blocks the site's executor, nor a reply that stops the SuperNode
(:mod:`medfed.client.ended_run_tasks`).

The SuperNode sends its heartbeat every ``MEDFED_HEARTBEAT_INTERVAL`` seconds (the
site's ``heartbeat_interval_s``; Flower's is a fixed 30 s).

A SuperNode whose connection to the SuperLink ended on an error exits (status 1)
rather than lingering, so that the site daemon restarts it.

Usage: ``python -m medfed.client.supernode_launcher [flower-supernode args]``.
"""

from __future__ import annotations

import os
import sys

from medfed.client.ended_run_tasks import drop_replies_of_ended_runs, withdraw_tasks_of_ended_runs
from medfed.core.flower_tuning import (
    back_off_idle_polls,
    set_heartbeat_interval,
    shorten_object_pull_backoff,
)
from medfed.core.idle_backoff import IdleBackoff
from medfed.core.parent_watch import watch_parent

POLL_ENV = "MEDFED_POLL_INTERVAL"
HEARTBEAT_ENV = "MEDFED_HEARTBEAT_INTERVAL"


def main() -> int:
    """Apply the poll caps (if configured) and run flower-supernode."""
    watch_parent()  # the site daemon owns this process; never outlive it
    from flwr.supernode import start_client_internal

    withdraw_tasks_of_ended_runs(start_client_internal)
    drop_replies_of_ended_runs(start_client_internal)
    cap = os.environ.get(POLL_ENV)
    if cap:
        # the 3 s sleep after an empty poll; a message's replies are pushed by _push_messages
        back_off_idle_polls(
            start_client_internal, IdleBackoff(float(cap)), idle_sleep=3, activity="_push_messages"
        )
        shorten_object_pull_backoff(start_client_internal, float(cap) / 4, 1.0)
    heartbeat = os.environ.get(HEARTBEAT_ENV)
    if heartbeat:
        set_heartbeat_interval(float(heartbeat))
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    code = int(flower_supernode() or 0)
    # Flower returns here only when its connection to the SuperLink ended on an error it
    # logged (a TLS failure, say); its runtime API thread would then keep this process
    # alive, doing nothing. End it, so that the site daemon starts a new SuperNode.
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code or 1)


if __name__ == "__main__":
    sys.exit(main())

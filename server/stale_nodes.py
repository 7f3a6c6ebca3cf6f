"""A SuperLink that starts has no site connected: forget the connections of its last life.

Flower 1.42 keeps each SuperNode's status in its database, with the time until which
the node counts as online (``online_until``, two heartbeat intervals ahead). After a
crash or a restart, every site that was connected still counts as online for up to
that long. Meanwhile the server refuses the site's new connection ("already
online") and hands runs to nodes nobody serves: a run started then fails with "Node
Unavailable" at every site. So, before Flower starts, the launcher marks every node
that its database holds as online offline, as of now.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from pathlib import Path

log = logging.getLogger("flwr")  # the SuperLink's own log


def mark_nodes_offline(database: Path) -> int:
    """Set every online node in the SuperLink ``database`` offline; returns how many.

    A database that is not a file (a new one, or one in memory), or has no node table,
    is left alone.
    """
    if not database.is_file():
        return 0
    now = dt.datetime.now(dt.timezone.utc)
    try:
        with sqlite3.connect(database, timeout=30.0) as conn:
            if (
                conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name='node'"
                ).fetchone()
                is None
            ):
                return 0
            changed = conn.execute(
                "UPDATE node SET status='offline', online_until=?, last_deactivated_at=? "
                "WHERE status='online'",
                (now.timestamp(), now.isoformat()),
            ).rowcount
    except sqlite3.Error as exc:  # Flower changed its schema: sites then wait it out
        log.warning(
            "medfed: could not mark the sites of the last start offline in %s (%s); "
            "a site may be let in only after its old connection times out",
            database,
            exc,
        )
        return 0
    if changed:
        log.info("medfed: %d site connection(s) of the last start marked offline", changed)
    return changed


def database_arg(argv: list[str]) -> Path | None:
    """The ``--database`` of flower-superlink's arguments, if given (in memory: no file)."""
    for i, arg in enumerate(argv):
        if arg == "--database" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--database="):
            return Path(arg.split("=", 1)[1])
    return None

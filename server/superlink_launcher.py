"""Run Flower's SuperLink so that it ends when `medfed server start` (its parent) ends.

Usage: ``python -m medfed.server.superlink_launcher [flower-superlink args]``.
"""

from __future__ import annotations

import sys

from medfed.core.parent_watch import watch_parent


def main() -> int:
    """Watch the parent, then run the stock flower-superlink entry point."""
    watch_parent()
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    return int(flower_superlink() or 0)


if __name__ == "__main__":
    sys.exit(main())

"""A site daemon and a ServerApp start without importing Opacus: only DP-SGD needs it."""

from __future__ import annotations

import subprocess
import sys


def test_opacus_is_imported_only_when_dp_sgd_runs() -> None:
    # ~1 s of CPU per process on a 2-core machine, paid by every site and every run.
    probe = (
        "import sys, medfed.client.daemon, medfed.client.app, medfed.server.app\n"
        "print('opacus' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"

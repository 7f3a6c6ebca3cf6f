"""The environment every Flower process medfed starts runs with."""

from __future__ import annotations

import sys
from pathlib import Path


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Telemetry and update checks off, Flower's state kept in ``flwr_home``, not ~/.flwr."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    return {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_HOME": str(flwr_home),
        # SuperExec launches ServerApp/ClientApp processes; Flower's default waits 1 s.
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.05",
        "PYTHONUNBUFFERED": "1",
    }


def python_entry(module_func: str) -> list[str]:
    """argv running ``module:function`` with this interpreter (no reliance on PATH)."""
    module, func = module_func.split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {func} as f; sys.exit(f())"]

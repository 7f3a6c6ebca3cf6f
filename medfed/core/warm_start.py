"""Start a run from an earlier run's checkpoint instead of the task's fresh weights.

``RunConfig.init_from = "RUN_ID"`` (its last checkpoint) or ``"RUN_ID:ROUND"``. The
server resolves it inside its own runs folder, so a coordinator can name a run it
launched from another machine. The checkpoint must hold exactly the weights this
run shares (same task, same adaptation hook): anything else is refused before a
round starts. Only the weights carry over; a strategy's server-side state (FedAdam's
moments, FedAvgM's momentum) starts afresh.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from medfed.core.errors import MedfedError
from medfed.core.packing import Layout
from medfed.core.runs import RunFolder

_SPEC = re.compile(r"(?P<run>[0-9]{1,20})(?::(?P<round>[0-9]{1,6}))?")


def checkpoint_path(runs_dir: Path, spec: str) -> Path:
    """The checkpoint file ``spec`` names inside ``runs_dir``."""
    match = _SPEC.fullmatch(spec.strip())
    if match is None:
        raise MedfedError(
            f"init_from {spec!r} is not a run reference.",
            where="run config 'init_from'",
            expected="RUN_ID or RUN_ID:ROUND",
            fix="`medfed runs` lists the run ids",
        )
    run = RunFolder(Path(runs_dir) / match["run"])
    kept = run.saved_rounds()
    if match["round"] is not None:
        path = run.checkpoint_file(int(match["round"]))
    else:
        path = run.checkpoint_file(kept[-1] if kept else 1)
    if not path.exists():
        raise MedfedError(
            f"init_from {spec!r}: there is no such checkpoint.",
            where=str(path),
            expected=f"a round the run kept: {', '.join(map(str, kept)) or 'none'}",
            fix="`medfed status RUN_ID` shows a run's rounds; name one it saved (a run "
            "with keep_checkpoints kept only its last rounds)",
        )
    return path


def load_start_weights(
    runs_dir: Path, spec: str, layout: Layout
) -> tuple[Path, dict[str, np.ndarray]]:
    """The weights ``spec`` names, checked against this run's shared ``layout``."""
    path = checkpoint_path(runs_dir, spec)
    with np.load(path, allow_pickle=False) as stored:
        weights = {k: stored[k] for k in stored.files}
    expected = dict(zip(layout.names, layout.shapes, strict=True))
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if found != expected:
        differ = sorted(set(found) ^ set(expected)) or sorted(
            k for k in expected if found[k] != expected[k]
        )
        raise MedfedError(
            f"init_from {spec!r}: the checkpoint holds a different model than this run "
            f"shares ({len(found)} tensors, this run {len(expected)}; first differences: "
            f"{differ[:3]}).",
            where=str(path),
            expected="a checkpoint of a run with the same task and the same adaptation hook",
            fix="name a run of this task, or run with that run's --adaptation",
        )
    return path, {k: weights[k] for k in layout.names}

"""Starting a run from an earlier run's checkpoint: resolving it and refusing a mismatch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medfed.core.errors import MedfedError
from medfed.core.packing import Layout
from medfed.core.runs import RunFolder
from medfed.core.warm_start import checkpoint_path, load_start_weights

WEIGHTS = {"a.weight": np.ones((2, 3), np.float32), "a.bias": np.zeros(2, np.float32)}


def saved_run(runs: Path, run_id: str, rounds: int) -> RunFolder:
    folder = RunFolder(runs / run_id)
    for r in range(1, rounds + 1):
        folder.save_checkpoint(r, {k: v + r for k, v in WEIGHTS.items()})
    return folder


def test_the_last_round_or_a_named_round_is_loaded(tmp_path: Path) -> None:
    saved_run(tmp_path, "42", rounds=11)  # round-011 must sort after round-009
    path, weights = load_start_weights(tmp_path, "42", Layout.of(WEIGHTS))
    assert path.name == "round-011.npz" and list(weights) == list(WEIGHTS)
    np.testing.assert_array_equal(weights["a.weight"], WEIGHTS["a.weight"] + 11)
    path, weights = load_start_weights(tmp_path, "42:3", Layout.of(WEIGHTS))
    assert path.name == "round-003.npz"
    np.testing.assert_array_equal(weights["a.bias"], WEIGHTS["a.bias"] + 3)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("../42", "not a run reference"),
        ("7", "no such checkpoint"),
        ("42:9", "no such checkpoint"),
    ],
)
def test_bad_references_are_refused_with_the_fix(tmp_path: Path, spec: str, message: str) -> None:
    saved_run(tmp_path, "42", rounds=2)
    with pytest.raises(MedfedError, match=message) as caught:
        checkpoint_path(tmp_path, spec)
    assert "medfed" in str(caught.value)  # the fix names a command


def test_a_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    saved_run(tmp_path, "42", rounds=1)
    other = {"a.weight": np.ones((2, 4), np.float32), "a.bias": np.zeros(2, np.float32)}
    with pytest.raises(MedfedError, match="different model") as caught:
        load_start_weights(tmp_path, "42", Layout.of(other))
    assert "a.weight" in str(caught.value) and "--adaptation" in str(caught.value)
    with pytest.raises(MedfedError, match="different model"):
        load_start_weights(tmp_path, "42", Layout.of({"a.weight": other["a.weight"]}))

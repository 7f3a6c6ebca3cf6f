"""`--track`: a run logged to MLflow and TensorBoard, read back with their own readers.

One DP run of `medfed simulate --track ... --track ...` (3 sites, 2 rounds) writes an
MLflow store and a TensorBoard event file; each metric of metrics.jsonl, per round
and per site (epsilon included), is read back from both.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_cli import medfed

from medfed.core.errors import ConfigError
from medfed.core.runs import RunFolder
from medfed.core.tracking import Tracker, round_scalars

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # this process reads the store too


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunFolder, Path]:
    root = tmp_path_factory.mktemp("tracked")
    out = medfed(
        *("simulate", "--task", "tiny-seg", "--sites", "3", "--rounds", "2"),
        *("--dp", "sample", "--site-budget", "unlimited", "--secure-aggregation", "off"),
        *("--track", f"mlflow:sqlite:///{root / 'mlflow.db'}", "--track", "tensorboard:tb"),
        *("--out", str(root / "runs")),
        cwd=root,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "tracked:    MLflow run" in out.stdout and "tracked:    TensorBoard" in out.stdout
    (run,) = [p for p in (root / "runs").iterdir() if (p / "run.json").exists()]
    return RunFolder(run), root


def _expected(folder: RunFolder) -> dict[str, list[tuple[int, float]]]:
    by_tag: dict[str, list[tuple[int, float]]] = {}
    for tag, rnd, value in round_scalars(folder):
        by_tag.setdefault(tag, []).append((rnd, value))
    return by_tag


def test_the_scalars_are_every_metric_of_the_run_folder(tracked: tuple[RunFolder, Path]) -> None:
    folder, _ = tracked
    expected = _expected(folder)
    sites = {m["site"] for m in folder.read_metrics() if m["site"] != "global"}
    assert sites == {"site-1", "site-2", "site-3"}
    for site in sites:  # per site per round: its epsilon and its score
        assert [r for r, _ in expected[f"train/{site}/epsilon-run"]] == [1, 2]
        assert [r for r, _ in expected[f"evaluate/{site}/dice"]] == [1, 2]
    assert [r for r, _ in expected["evaluate/dice"]] == [1, 2]  # the global model's


def test_mlflow_holds_the_runs_parameters_metrics_and_model(
    tracked: tuple[RunFolder, Path],
) -> None:
    from mlflow.tracking import MlflowClient

    folder, root = tracked
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("medfed")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["medfed.run_id"] == folder.path.name
    assert run.data.params["task"] == "tiny-seg" and run.data.params["privacy.mode"] == "sample"
    for tag, points in _expected(folder).items():
        history = client.get_metric_history(run.info.run_id, tag)
        assert sorted((m.step, m.value) for m in history) == sorted(points), tag
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "report.md", "report.html", "metrics.jsonl"} <= artifacts
    (model,) = client.list_artifacts(run.info.run_id, "model")
    assert model.path == "model/round-002.npz"


def test_tensorboard_holds_the_same_scalars(tracked: tuple[RunFolder, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, root = tracked
    events = EventAccumulator(str(root / "tb" / f"run-{folder.path.name}"))
    events.Reload()
    expected = _expected(folder)
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = events.Scalars(tag)
        assert [e.step for e in got] == [r for r, _ in points], tag
        # float32 in the event file
        assert [e.value for e in got] == pytest.approx([v for _, v in points], rel=1e-6), tag


@pytest.mark.parametrize(
    ("text", "complaint"),
    [("wandb", "Unknown tracker 'wandb'"), ("mlflow:./store", "Not an MLflow tracking URI")],
)
def test_a_bad_tracker_is_refused_with_the_fix(text: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint) as caught:
        Tracker.parse(text)
    assert "mlflow" in caught.value.expected and caught.value.fix


def test_a_bad_tracker_fails_before_the_run_starts(tmp_path: Path) -> None:
    out = medfed(
        *("simulate", "--task", "tiny-seg", "--track", "wandb", "--out", str(tmp_path / "r")),
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "Unknown tracker 'wandb'" in out.stderr
    assert not (tmp_path / "r").exists()


def test_the_defaults_are_local_files(tmp_path: Path) -> None:
    assert Tracker.parse("mlflow", base=tmp_path).location == f"sqlite:///{tmp_path}/mlflow.db"
    assert Tracker.parse("tensorboard", base=tmp_path).location == str(tmp_path / "tensorboard")


def test_medfed_track_logs_a_past_run_from_its_folder(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medfed.core.config import RunConfig

    assert medfed("server", "init", str(tmp_path / "fed"), "--port", "9").returncode == 0
    folder = RunFolder.create(tmp_path / "fed" / "runs", 31, RunConfig(task="tiny-seg"))
    folder.metrics(1, "site-a", "evaluate", {"dice": 0.25, "num-examples": 4})
    cfg = str(tmp_path / "fed" / "server.toml")
    out = medfed("track", "31", "--to", "tensorboard:tb", "--config", cfg, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    events = EventAccumulator(str(tmp_path / "tb" / "run-31"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("evaluate/site-a/dice")] == [(1, 0.25)]
    missing = medfed("track", "32", "--to", "tensorboard", "--config", cfg, cwd=tmp_path)
    assert missing.returncode != 0 and "No run 32" in missing.stdout + missing.stderr

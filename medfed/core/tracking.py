"""A finished run, logged to the researcher's experiment tracker: MLflow or TensorBoard.

The run folder stays the one source of truth; this reads it (run.json, metrics.jsonl,
summary.json, the final checkpoint) and writes it with the trackers' own libraries:

- **MLflow** (``mlflow[:URI]``): one MLflow run per medfed run, in the experiment
  "medfed", with the run configuration as parameters, every metric per round (the
  global model's as ``evaluate/dice``, each site's as ``train/site-a/epsilon-run``),
  the outcome as tags, and the final model, the report and the metrics file as
  artifacts. The default URI is a local SQLite store, ``sqlite:///mlflow.db`` in the
  working directory (MLflow 3 keeps its file store in maintenance mode); artifacts go
  to ``mlartifacts/`` beside it.
- **TensorBoard** (``tensorboard[:DIR]``): an event file under ``DIR/run-<id>/``
  (default DIR: ``tensorboard`` in the working directory) with the same scalars (step
  = round) and the configuration as text. TensorBoard has no artifacts: the model
  stays in the run folder, whose path is logged.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from medfed.core.errors import ConfigError
from medfed.core.runs import RunFolder

#: The MLflow experiment every medfed run is logged to.
EXPERIMENT = "medfed"


@dataclass(frozen=True)
class Tracker:
    """Where a run is logged: ``kind`` and its location (an MLflow URI or a directory)."""

    kind: Literal["mlflow", "tensorboard"]
    location: str

    @classmethod
    def parse(cls, text: str, *, base: Path | None = None) -> Tracker:
        """``mlflow``, ``mlflow:URI``, ``tensorboard`` or ``tensorboard:DIR``.

        Relative defaults are under ``base`` (the working directory when None).
        """
        root = Path.cwd() if base is None else Path(base)
        kind, _, where = text.partition(":")
        if kind == "mlflow":
            if not where:
                where = f"sqlite:///{(root / 'mlflow.db').resolve()}"
            elif "://" not in where and not where.startswith("sqlite:"):
                raise ConfigError(
                    f"Not an MLflow tracking URI: {where!r}.",
                    where="--track",
                    expected="mlflow, or mlflow:URI with a scheme (sqlite:///path/mlflow.db, "
                    "http://127.0.0.1:5000)",
                    fix="give the URI with its scheme, e.g. --track mlflow:sqlite:///runs.db",
                )
            return cls("mlflow", where)
        if kind == "tensorboard":
            return cls("tensorboard", str((root / (where or "tensorboard")).resolve()))
        raise ConfigError(
            f"Unknown tracker {kind!r} in --track {text!r}.",
            where="--track",
            expected="mlflow[:URI] or tensorboard[:DIR]",
            fix="e.g. --track mlflow, or --track tensorboard:./tb",
        )

    def log(self, folder: RunFolder) -> str:
        """Log the run in ``folder``; returns where it went (for the user)."""
        if self.kind == "mlflow":
            return _log_mlflow(folder, self.location)
        return _log_tensorboard(folder, Path(self.location))


def run_parameters(folder: RunFolder) -> dict[str, str]:
    """The run configuration, flattened (``privacy.noise_multiplier``), as text."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in sorted(value.items()):
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = json.dumps(value) if isinstance(value, list | tuple) else str(value)

    walk("", folder.read_run().get("config", {}))
    return flat


def round_scalars(folder: RunFolder) -> list[tuple[str, int, float]]:
    """(tag, round, value) of every numeric metric in metrics.jsonl.

    Tags: ``PHASE/METRIC`` for the global model, ``PHASE/SITE/METRIC`` for a site.
    """
    out = []
    for line in folder.read_metrics():
        rnd, site, phase = int(line["round"]), str(line["site"]), str(line["phase"])
        for key, value in sorted(line.items()):
            if key in ("round", "site", "phase") or isinstance(value, bool):
                continue
            if isinstance(value, int | float) and math.isfinite(value):
                tag = f"{phase}/{key}" if site == "global" else f"{phase}/{site}/{key}"
                out.append((tag, rnd, float(value)))
    return out


def _log_mlflow(folder: RunFolder, uri: str) -> str:
    # MLflow 3 sends usage telemetry to its maintainers unless told not to: a hospital's
    # machine talks only to the tracker the user named.
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["DO_NOT_TRACK"] = "true"
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        artifacts = None
        if uri.startswith("sqlite:///"):  # artifacts beside the database, not in the cwd
            artifacts = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
        experiment_id = client.create_experiment(EXPERIMENT, artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
    summary = folder.read_summary()
    tags = {
        "medfed.run_id": folder.path.name,
        "medfed.run_folder": str(folder.path),
        "medfed.status": summary.status if summary else "not finished",
    }
    run = client.create_run(experiment_id, run_name=f"run {folder.path.name}", tags=tags)
    run_id = run.info.run_id
    params = [mlflow.entities.Param(k, v[:6000]) for k, v in run_parameters(folder).items()]
    metrics = [
        mlflow.entities.Metric(tag, value, timestamp=0, step=rnd)
        for tag, rnd, value in round_scalars(folder)
    ]
    for start in range(0, len(params), 100):  # MLflow's limits per batch
        client.log_batch(run_id, params=params[start : start + 100])
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    if summary is not None and summary.final_checkpoint:
        model = folder.path / "checkpoints" / summary.final_checkpoint
        client.log_artifact(run_id, str(model), "model")
    for name in ("report.md", "report.html", "metrics.jsonl", "summary.json", "metrics.png"):
        if (folder.path / name).exists():
            client.log_artifact(run_id, str(folder.path / name))
    if summary is None:
        ended = "RUNNING"  # logged while it goes on: the next --track logs it again
    else:
        ended = "FINISHED" if summary.completed else "FAILED"
    client.set_terminated(run_id, status=ended)
    return f"MLflow run {run_id} in {uri} (experiment {EXPERIMENT!r})"


def _log_tensorboard(folder: RunFolder, root: Path) -> str:
    from torch.utils.tensorboard import SummaryWriter

    log_dir = root / f"run-{folder.path.name}"
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for tag, rnd, value in round_scalars(folder):
            writer.add_scalar(tag, value, global_step=rnd)
        config = json.dumps(folder.read_run().get("config", {}), indent=2)
        writer.add_text("medfed/config", f"```\n{config}\n```", global_step=0)
        writer.add_text("medfed/run_folder", str(folder.path), global_step=0)
    finally:
        writer.close()
    return f"TensorBoard events in {log_dir}"

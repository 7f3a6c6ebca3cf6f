"""Public pretraining: Colin27 data, `medfed pretrain`, shipped weights, runs that start there."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medfed.core.config import DataSourceConfig, RunConfig
from medfed.core.errors import MedfedError
from medfed.synth.colin27 import colin27_missing
from medfed.synth.public import public_subjects
from medfed.tasks import engine, get_task
from medfed.tasks.adaptation import local_keys
from medfed.tasks.pretrain import (
    PretrainRecipe,
    check_init,
    initial_weights,
    load_public_weights,
    pretrain,
    save_weights,
)

TISSUE = get_task("brain-tissue-seg")
#: The public data is Colin27 from Debian's mricron-data (`make test` installs it).
needs_colin27 = pytest.mark.skipif(
    bool(colin27_missing()), reason=f"needs Debian's mricron-data: {colin27_missing()}"
)


@needs_colin27
def test_public_subjects_are_reproducible_and_their_scanners_random() -> None:
    a, b = public_subjects(3, seed=7), public_subjects(3, seed=7)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.label, y.label)
    other = public_subjects(1, seed=8)[0]
    assert not np.array_equal(other.label, a[0].label)
    # Tissue contrast is drawn per subject: the order of the tissues' mean intensities varies.
    orders = set()
    for vol in public_subjects(8, seed=7):
        means = [float(vol.image[vol.label == t].mean()) for t in (1, 2, 3)]
        orders.add(tuple(np.argsort(means)))
    assert len(orders) >= 3
    with pytest.raises(ValueError, match="positive count"):
        public_subjects(0, seed=1)


@needs_colin27
def test_pretrain_writes_weights_and_recipe_that_a_task_then_starts_from(tmp_path: Path) -> None:
    recipe = PretrainRecipe(subjects=2, steps=3, batch_size=8, seed=3)
    weights, info = pretrain(TISSUE, recipe, device=torch.device("cpu"))
    fresh = TISSUE.build_model().state_dict()
    assert {k: v.shape for k, v in weights.items()} == {k: tuple(v.shape) for k, v in fresh.items()}
    assert info["steps"] >= 3 and info["recipe"]["subjects"] == 2
    path = save_weights(tmp_path / "w", weights, info)
    assert path.suffix == ".npz"
    assert json.loads(path.with_suffix(".json").read_text())["task"] == "brain-tissue-seg"
    task = dataclasses.replace(TISSUE, public_weights=path)
    loaded = initial_weights(task, seed=0, init="public")
    for key, value in weights.items():
        np.testing.assert_array_equal(loaded[key], value)
    # A random start is the seeded fresh model, whatever public weights the task has.
    torch.manual_seed(5)
    seeded = engine.get_weights(TISSUE.build_model())
    randomly = initial_weights(task, seed=5, init="random")
    for key, value in seeded.items():
        np.testing.assert_array_equal(randomly[key], value)


def test_a_task_without_public_weights_or_with_a_wrong_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MedfedError, match="ships no public weights") as err:
        check_init(get_task("tiny-seg"), "public")
    assert "--init-weights public" in (err.value.fix or "")
    check_init(get_task("tiny-seg"), "random")
    with pytest.raises(MedfedError, match="declares no public training data"):
        pretrain(get_task("tiny-seg"), PretrainRecipe(subjects=1, steps=1))
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **engine.get_weights(get_task("tiny-seg").build_model()))
    with pytest.raises(MedfedError, match="do not fit its model") as err:
        load_public_weights(dataclasses.replace(TISSUE, public_weights=wrong))
    assert "medfed pretrain --task brain-tissue-seg" in (err.value.fix or "")
    with pytest.raises(MedfedError, match="that file is missing"):
        load_public_weights(dataclasses.replace(TISSUE, public_weights=tmp_path / "none.npz"))


def test_the_shipped_weights_segment_a_site_they_never_saw() -> None:
    """Zero-shot on a synthesized site (a scanner profile the public set never used)."""
    data = TISSUE.load_site_data(DataSourceConfig(kind="synthetic", num_samples=32, profile=1))
    scores = {}
    for init in ("random", "public"):
        model = TISSUE.build_model()
        engine.set_weights(model, initial_weights(TISSUE, seed=0, init=init))
        scores[init] = engine.evaluate(TISSUE, model, data.val, device=torch.device("cpu"))["dice"]
    assert scores["public"] > 0.5 > 0.3 > scores["random"], scores
    recipe = json.loads(TISSUE.public_weights.with_suffix(".json").read_text())
    assert recipe["task"] == TISSUE.name and recipe["recipe"]["steps"] > 0


def test_a_site_starts_its_own_parameters_from_the_public_weights(tmp_path: Path) -> None:
    from medfed.client.worker import SiteWorker

    run = RunConfig(task=TISSUE.name, adaptation="site-input-output", init_weights="public")
    local = local_keys(TISSUE, TISSUE.build_model(), run.adaptation)
    start = SiteWorker._initial_local(TISSUE, run, local)
    public = load_public_weights(TISSUE)
    assert set(start) == set(local)
    for key in local:
        np.testing.assert_array_equal(start[key], public[key])


def test_the_run_report_names_the_initial_model(tmp_path: Path) -> None:
    from medfed.core.run_report import write_report
    from medfed.core.run_summary import RunSummary
    from medfed.core.runs import RunFolder

    folder = RunFolder.create(tmp_path, 3, RunConfig(task=TISSUE.name, init_weights="public"))
    folder.write_summary(RunSummary(status="completed", run_id="3", primary_metric="dice"))
    text = write_report(folder).read_text()
    assert "initial model: the task's public weights" in text
    folder = RunFolder.create(tmp_path, 4, RunConfig(task=TISSUE.name))
    folder.write_summary(RunSummary(status="completed", run_id="4", primary_metric="dice"))
    assert "initial model: random (seeded)" in write_report(folder).read_text()


def _medfed(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medfed", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_cli_lists_public_weights_and_refuses_them_where_a_task_has_none(tmp_path: Path) -> None:
    out = _medfed("tasks", cwd=tmp_path)
    assert out.returncode == 0 and "public weights" in out.stdout
    out = _medfed(
        "run",
        "--task",
        "tiny-seg",
        "--init-weights",
        "public",
        "--server",
        "127.0.0.1:1",
        "--ca",
        "x.pem",
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "ships no public weights" in out.stderr
    assert "Traceback" not in out.stderr
    out = _medfed(
        "run",
        "--task",
        "tiny-seg",
        "--init-weights",
        "pubic",
        "--server",
        "127.0.0.1:1",
        "--ca",
        "x.pem",
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "init_weights" in out.stderr
    out = _medfed("pretrain", "--task", "tiny-seg", "--out", "w.npz", cwd=tmp_path)
    assert out.returncode == 2 and "no public training data" in out.stderr


@needs_colin27
def test_cli_pretrain_writes_a_weights_file(tmp_path: Path) -> None:
    out = _medfed(
        "pretrain",
        "--task",
        "brain-tissue-seg",
        "--out",
        "w.npz",
        "--subjects",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "8",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout and (tmp_path / "w.npz").is_file()
    assert json.loads((tmp_path / "w.json").read_text())["recipe"]["steps"] == 2

"""`medfed compare`: strategies x adaptation hooks x preprocessing on one federation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import medfed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "fedadam:eta=0.1"], "names no strategy of this comparison"),
        (["-o", "fedprox:proximal_m=0.1"], "did you mean 'proximal_mu'"),
        (["--adaptations", "fedbm"], "did you mean 'fedbn'"),
        (["--dp", "off,dp-sgd"], "Unknown or repeated value in --dp"),
        (["--harmonizations", "histo"], "Unknown or repeated value in --harmonizations"),
        (["--augmentations", "contrast,contrast"], "Unknown or repeated value in --augmentations"),
        (["--harmonizations", "off,histogram", "--dp", "off,sample"], "DP (sample) does not"),
        (["--dp", "sample", "--dp-optimizer", "rmsprop"], "--dp sample"),
        (["--sites", "20"], "at most 8 site daemons"),
        (["--engine", "ray"], "Unknown engine"),
    ],
)
def test_bad_input_is_refused_before_anything_starts(
    tmp_path: Path, args: list[str], message: str
) -> None:
    out = medfed(
        "compare",
        "--strategies",
        "fedavg,fedprox",
        *args,
        "--out",
        str(tmp_path / "cmp"),
        cwd=tmp_path,
    )
    assert out.returncode == 2 and message in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "cmp").exists()  # nothing was created or started


def test_the_preprocessing_choices_are_the_run_configs() -> None:
    import typing

    from medfed.cli.compare_cmd import AUGMENTATIONS, HARMONIZATIONS
    from medfed.core.config import RunConfig

    fields = RunConfig.model_fields
    assert HARMONIZATIONS == typing.get_args(fields["harmonization"].annotation)
    assert AUGMENTATIONS == typing.get_args(fields["augmentation"].annotation)


@pytest.mark.slow
def test_two_strategies_are_compared_on_the_same_sites(short_tmp: Path) -> None:
    out = medfed(
        "compare",
        "--strategies",
        "fedavg,fedprox",
        "-o",
        "fedprox:proximal_mu=0.1",
        "--sites",
        "2",
        "--rounds",
        "1",
        "--repeats",
        "2",
        "--seed",
        "5",
        "--out",
        str(short_tmp / "cmp"),
        cwd=short_tmp,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((short_tmp / "cmp" / "compare.json").read_text())
    assert sorted((r["strategy"], r["seed"]) for r in result["runs"]) == [
        ("fedavg", 5),
        ("fedavg", 6),
        ("fedprox", 5),
        ("fedprox", 6),
    ]
    for r in result["runs"]:
        assert r["status"] == "completed" and r["adaptation"] == "none"
        assert set(r["sites"]) == {"site-1", "site-2"}
        assert 0.0 < r["mean"] <= 1.0
        assert r["mean"] == pytest.approx(sum(r["sites"].values()) / 2)
        assert Path(r["run_folder"], "summary.json").exists()
    rows = {r["strategy"]: r for r in result["combinations"]}
    assert set(rows) == {"fedavg", "fedprox"}
    assert rows["fedprox"]["options"] == {"proximal_mu": 0.1}
    for strategy, row in rows.items():
        means = [r["mean"] for r in result["runs"] if r["strategy"] == strategy]
        assert row["runs"] == row["completed"] == 2
        assert row["mean"] == pytest.approx(sum(means) / 2)
        assert row["std"] == pytest.approx(abs(means[0] - means[1]) / 2**0.5)
    assert "mean dice" in out.stdout and "fedprox" in out.stdout and " ± " in out.stdout


@pytest.mark.slow
def test_dp_runs_are_scored_against_their_non_private_twins(short_tmp: Path) -> None:
    out = medfed(
        "compare",
        "--strategies",
        "fedavg",
        "--dp",
        "off,sample",
        "--target-epsilon",
        "50",
        "--accountant",
        "prv",
        "--dp-optimizer",
        "sgd",
        "--dp-lr",
        "0.1",
        "--max-grad-norm",
        "0.5",
        "--sites",
        "2",
        "--rounds",
        "1",
        "--out",
        str(short_tmp / "cmp"),
        cwd=short_tmp,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((short_tmp / "cmp" / "compare.json").read_text())
    runs = {r["dp"]: r for r in result["runs"]}
    rows = {r["dp"]: r for r in result["combinations"]}
    assert set(runs) == set(rows) == {"off", "sample"}
    assert result["privacy"]["sample"]["target_epsilon"] == 50.0
    assert runs["off"]["epsilon"] is None and "vs_no_dp" not in rows["off"]
    # each site spends at most the target (PRV; the sites derive their noise from it)
    assert 0.0 < runs["sample"]["epsilon"] <= 50.0
    assert rows["sample"]["vs_no_dp"] == pytest.approx(runs["sample"]["mean"] / runs["off"]["mean"])
    # the DP run trained with its own recipe, the plain one with the task's defaults
    dp_run = json.loads(Path(runs["sample"]["run_folder"], "run.json").read_text())
    plain_run = json.loads(Path(runs["off"]["run_folder"], "run.json").read_text())
    assert dp_run["config"]["learning_rate"] == 0.1
    assert plain_run["config"]["learning_rate"] is None
    assert "DP/plain" in out.stdout and "dice per site" in out.stdout


@pytest.mark.slow
def test_harmonization_and_augmentation_are_compared_as_options_of_their_own(
    short_tmp: Path,
) -> None:
    out = medfed(
        "compare",
        "--strategies",
        "fedavg",
        "--harmonizations",
        "off,histogram",
        "--augmentations",
        "off,contrast",
        "--engine",
        "simulation",
        "--sites",
        "2",
        "--rounds",
        "1",
        "--out",
        str(short_tmp / "cmp"),
        cwd=short_tmp,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((short_tmp / "cmp" / "compare.json").read_text())
    runs = {(r["harmonization"], r["augmentation"]): r for r in result["runs"]}
    assert (
        set(runs)
        == {(h, a) for h in ("off", "histogram") for a in ("off", "contrast")}
        == {(r["harmonization"], r["augmentation"]) for r in result["combinations"]}
    )
    for (harmonization, augmentation), r in runs.items():
        assert r["status"] == "completed", r
        folder = Path(r["run_folder"])
        config = json.loads((folder / "run.json").read_text())["config"]
        assert (config["harmonization"], config["augmentation"]) == (harmonization, augmentation)
        # the sites compare made may send landmarks even under secure aggregation (default)
        assert config["secure_aggregation"] != "off"
        events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
        agreed = [e for e in events if e.get("event") == "harmonization"]
        assert len(agreed) == (harmonization == "histogram")
    # same seed and sites: what the preprocessing changes is what the model learns
    assert len({r["mean"] for r in runs.values()}) == 4
    assert "preprocessing" in out.stdout and "histogram + contrast" in out.stdout
    assert "policy.share_landmarks = true" in out.stdout

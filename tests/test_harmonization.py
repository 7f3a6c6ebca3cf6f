"""Histogram standardization on federated landmarks (tasks/harmonization.py, the site's rules)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from medfed.core import wire
from medfed.core.config import RunConfig, SiteConfig, validate
from medfed.core.schema import LandmarkReport, SiteInstruction, SiteReply, SiteRequest
from medfed.tasks.base import SiteData
from medfed.tasks.harmonization import (
    LANDMARK_PERCENTILES,
    federated_standard,
    harmonize,
    otsu_threshold,
    scan_landmarks,
    site_landmarks,
    standardize,
)


def _scan(seed: int, *, gamma: float = 1.0, gain: float = 1.0, n: int = 2048) -> torch.Tensor:
    """A 'scan': noisy air around a head of three tissues, through a scanner's curve."""
    g = torch.Generator().manual_seed(seed)
    tissue = torch.randint(1, 4, (n,), generator=g).double()
    values = (0.3 * tissue + 0.03 * torch.randn(n, generator=g, dtype=torch.float64)).clamp(0.1, 1)
    values = gain * values**gamma
    air = 0.02 * torch.randn(2 * n, generator=g, dtype=torch.float64).abs()
    return torch.cat([air, values]).float()


def test_each_scans_landmarks_go_exactly_onto_the_standard() -> None:
    image = _scan(1, gamma=1.7)
    landmarks = scan_landmarks(image)
    standard = np.linspace(0.05, 0.95, len(LANDMARK_PERCENTILES))
    mapped = standardize(torch.as_tensor(landmarks), landmarks, standard)
    np.testing.assert_allclose(mapped.numpy(), standard, atol=1e-9)
    # and so are the quantiles of the mapped scan's foreground (the mapping is monotone)
    foreground = image > otsu_threshold(image.double().numpy())
    mapped_foreground = standardize(image, landmarks, standard)[foreground].double()
    q = torch.tensor(LANDMARK_PERCENTILES, dtype=torch.float64) / 100
    np.testing.assert_allclose(torch.quantile(mapped_foreground, q), standard, atol=2e-3)


def test_the_mapping_is_piecewise_linear_and_monotone() -> None:
    landmarks = np.array([0.0, 0.1, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    standard = np.linspace(0.0, 1.0, 11)
    v = torch.linspace(-0.5, 1.5, 2001, dtype=torch.float64)
    out = standardize(v, landmarks, standard)
    assert torch.all(out[1:] >= out[:-1])
    # halfway between two landmarks lands halfway between their standard values
    mid = standardize(torch.tensor([0.2, 0.325], dtype=torch.float64), landmarks, standard)
    np.testing.assert_allclose(mid.numpy(), [0.15, 0.25])
    # beyond the ends the end segments go on (no clipping)
    ends = standardize(torch.tensor([-0.1, 1.1], dtype=torch.float64), landmarks, standard)
    np.testing.assert_allclose(ends.numpy(), [-0.1, 1.1])


def test_tied_landmarks_still_give_a_monotone_mapping() -> None:
    image = torch.cat([torch.zeros(100), torch.full((300,), 0.5), torch.linspace(0.6, 1, 100)])
    landmarks = scan_landmarks(image)
    assert np.all(np.diff(landmarks) > 0)
    out = standardize(torch.sort(image).values, landmarks, np.linspace(0, 1, 11))
    assert torch.all(out[1:] >= out[:-1])


def test_the_standard_is_the_scan_weighted_average_the_server_computes() -> None:
    a = np.linspace(0.1, 0.9, 11)
    b = np.linspace(0.2, 1.0, 11) ** 2
    got = federated_standard([a, b], [3, 1])
    np.testing.assert_allclose(got, (3 * a + b) / 4)
    with pytest.raises(ValueError):
        federated_standard([a[:5]], [1])


def _site(seeds: list[int], **scanner: float) -> SiteData:
    scans = [_scan(s, **scanner) for s in seeds]
    x = torch.stack([s.reshape(1, 96, 64) for s in scans])
    y = torch.zeros(len(scans), 1, 96, 64, dtype=torch.int64)
    return SiteData(train=TensorDataset(x[:-1], y[:-1]), val=TensorDataset(x[-1:], y[-1:]))


def test_two_scanners_give_matching_histograms_once_harmonized() -> None:
    soft = _site([1, 2, 3, 4], gamma=0.6, gain=1.0)
    hard = _site([5, 6, 7, 8], gamma=1.6, gain=0.8)
    (la, na), (lb, nb) = site_landmarks(soft), site_landmarks(hard)
    assert (na, nb) == (3, 3)
    standard = federated_standard([la, lb], [na, nb])

    def quantiles(data: SiteData) -> np.ndarray:
        # each scan's foreground: the validation scan (never seen by the landmarks) and a
        # training one
        scans = [data.val[0][0].reshape(-1), data.train[0][0].reshape(-1)]
        q = np.linspace(0.05, 0.95, 19)
        return np.stack(
            [np.quantile(v[v > otsu_threshold(v.double().numpy())].numpy(), q) for v in scans]
        )

    before = np.abs(quantiles(soft) - quantiles(hard))
    after = np.abs(quantiles(harmonize(soft, standard)) - quantiles(harmonize(hard, standard)))
    # the same tissue at the same value: typically within 0.01 (a quantile next to a jump
    # between tissues may move further), where the scanners put it 0.1 to 0.35 apart
    assert np.median(before) > 0.1 and np.median(after) < 0.01, (before, after)
    assert after.max() < 0.2 * before.max()


def test_a_landmark_report_reads_back_and_rejects_junk() -> None:
    report = LandmarkReport(tuple(np.linspace(0, 1, 11)), 4)
    assert LandmarkReport.from_metrics(report.metrics()) == report
    with pytest.raises(ValueError):
        LandmarkReport.from_metrics({"landmarks": [0.5, 0.2], "landmark-scans": 1})
    asked = SiteInstruction(landmarks_query=1, standard_landmarks=(0.1, 0.5, 0.9))
    assert SiteInstruction.read(asked.entries(), {}) == asked


# ----------------------------------------------------------------- the site's rules


def _worker(tmp_path: Path, *, share: bool = False, dp_required: bool = False) -> Any:
    from medfed.client.worker import SiteWorker

    data: dict[str, Any] = {
        "site": {"name": "site-a"},
        "data": {"kind": "synthetic", "seed": 3, "num_samples": 16},
        "policy": {"share_landmarks": share},
        "compute": {"device": "cpu"},
    }
    if dp_required:
        data["privacy"] = {
            "default": "d",
            "datasets": {"d": {"epsilon_max": 10.0, "dp_required": True}},
        }
    path = tmp_path / "site.toml"
    path.write_text("")
    return SiteWorker(validate(SiteConfig, data, where="test"), path)


def _ask(worker: Any, run: RunConfig) -> SiteReply:
    asked = SiteInstruction(run=run.to_json(), landmarks_query=1)
    frame = wire.Frame(SiteRequest("query", "7", asked.entries()).header())
    return SiteReply.from_header(worker.handle(frame).header)


@pytest.mark.parametrize(
    ("run", "site", "rule"),
    [
        ({"secure_aggregation": "off"}, {}, None),
        ({"secure_aggregation": "default"}, {"share": True}, None),
        ({"secure_aggregation": "default"}, {}, "policy.share_landmarks"),
        (
            {"secure_aggregation": "off", "privacy": {"mode": "sample", "noise_multiplier": 1}},
            {"share": True},
            "privacy.mode",
        ),
        ({"secure_aggregation": "off"}, {"dp_required": True}, "privacy.datasets.d.dp_required"),
    ],
)
def test_a_site_sends_landmarks_only_where_its_rules_allow(
    tmp_path: Path, run: dict[str, Any], site: dict[str, Any], rule: str | None
) -> None:
    worker = _worker(tmp_path, **site)
    config = RunConfig.model_validate({"task": "tiny-seg", "harmonization": "histogram", **run})
    reply = _ask(worker, config)
    audit = (tmp_path / "audit.jsonl").read_text() if (tmp_path / "audit.jsonl").exists() else ""
    if rule is None:
        assert reply.ok, reply.error
        report = LandmarkReport.from_metrics(reply.metrics)
        assert report.scans >= 1 and len(report.landmarks) == len(LANDMARK_PERCENTILES)
    else:
        assert not reply.ok and reply.error is not None
        assert reply.error.status == "refused" and reply.error.rule == rule
        assert "landmarks-sent" not in audit


def test_a_harmonizing_run_without_the_standard_is_not_trained(tmp_path: Path) -> None:
    worker = _worker(tmp_path)
    run = RunConfig.model_validate(
        {"task": "tiny-seg", "harmonization": "histogram", "secure_aggregation": "off"}
    )
    asked = SiteInstruction(run=run.to_json(), server_round=1)
    frame = wire.Frame(SiteRequest("evaluate", "7", asked.entries()).header())
    reply = SiteReply.from_header(worker.handle(frame).header)
    assert not reply.ok and reply.error is not None and reply.error.rule == "harmonization"


def test_a_simulated_harmonized_run_agrees_on_landmarks_and_trains(tmp_path: Path) -> None:
    from medfed.local.sim_sites import synthetic_sites
    from medfed.local.simulation import simulate

    run = RunConfig.model_validate(
        {
            "task": "tiny-seg",
            "rounds": 2,
            "min_sites": 3,
            "seed": 5,
            "secure_aggregation": "off",
            "harmonization": "histogram",
        }
    )
    folder, summary = simulate(run, synthetic_sites(3), tmp_path)
    assert summary.status == "completed", summary.reason
    agreed = [e for e in folder.read_events() if e.event == "harmonization"]
    assert len(agreed) == 1 and len(agreed[0]["standard"]) == len(LANDMARK_PERCENTILES)
    assert agreed[0]["sites"] == ["site-1", "site-2", "site-3"]
    train = [m for m in folder.read_metrics() if m["phase"] == "train" and m["site"] != "global"]
    assert {m["round"] for m in train} == {1, 2}


def test_a_harmonized_run_under_secure_aggregation_is_refused_by_the_sites_rule(
    tmp_path: Path,
) -> None:
    from medfed.local.sim_sites import synthetic_sites
    from medfed.local.simulation import simulate

    run = RunConfig.model_validate(
        {"task": "tiny-seg", "rounds": 1, "min_sites": 2, "harmonization": "histogram"}
    )
    _, summary = simulate(run, synthetic_sites(2), tmp_path)
    assert summary.status == "refused"
    assert "policy.share_landmarks" in (summary.reason or "")


#: ``build_run_config``'s arguments for a one-round tiny-seg run (``dp`` aside).
_RUN_OPTIONS: dict[str, Any] = {
    "task": "tiny-seg",
    "strategy": "fedavg",
    "rounds": 1,
    "strategy_option": None,
    "min_sites": 2,
    "local_epochs": None,
    "batch_size": None,
    "lr": None,
    "seed": 0,
    "round_timeout": 60.0,
    "name": "",
    "noise_multiplier": 1.0,
    "target_epsilon": 0.0,
    "max_grad_norm": 1.0,
    "clipping_norm": 1.0,
    "delta": 1e-5,
    "accountant": "rdp",
    "dp_optimizer": "adam",
    "dp_average": 0.0,
    "privacy_unit": "sample",
    "secure_aggregation": "off",
    "dataset": "",
    "adaptation": "none",
    "init_from": "",
    "init_weights": "random",
    "where": "test",
    "harmonization": "histogram",
}


def test_the_run_options_refuse_harmonization_under_dp_before_anything_starts() -> None:
    from medfed.cli.run_cmd import build_run_config
    from medfed.core.errors import ConfigError

    assert build_run_config(dp="off", **_RUN_OPTIONS).harmonization == "histogram"
    with pytest.raises(ConfigError, match="privacy.mode"):
        build_run_config(dp="sample", **_RUN_OPTIONS)


class _SilentGrid:
    """A grid that must not be used: any message to the sites fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the sites were asked ({name})")


def test_a_resumed_run_keeps_the_standard_it_agreed_on_and_asks_no_site(tmp_path: Path) -> None:
    from medfed.core.runs import RunFolder
    from medfed.server.harmonization import agree_standard
    from medfed.server.refusals import RefusalPolicy

    run = RunConfig(task="tiny-seg", rounds=2, harmonization="histogram")
    folder = RunFolder.create(tmp_path, 1, run)
    ask: dict[str, Any] = {
        "grid": _SilentGrid(),
        "min_sites": 2,
        "run_entries": {},
        "refusals": RefusalPolicy(),
        "folder": folder,
        "timeout": 5.0,
    }
    with pytest.raises(AssertionError, match="the sites were asked"):
        agree_standard(**ask, resumed=True)  # nothing agreed yet: asked as at a first start
    agreed = [round(0.1 * i, 6) for i in range(len(LANDMARK_PERCENTILES))]
    folder.event("harmonization", method="histogram", sites=["site-1", "site-2"], standard=agreed)
    assert agree_standard(**ask, resumed=True) == tuple(agreed)
    said = [e for e in folder.read_events() if e.event == "harmonization"]
    assert len(said) == 2 and said[1]["kept_at_resume"] is True
    assert said[1]["standard"] == agreed and said[1]["sites"] == ["site-1", "site-2"]
    with pytest.raises(AssertionError, match="the sites were asked"):
        agree_standard(**ask)  # a first start always asks


def _task_with_public_standard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """tiny-seg under another name, with public weights and a public standard in tmp_path."""
    import dataclasses

    from medfed.core.config import DataSourceConfig
    from medfed.tasks import TASKS, engine, get_task
    from medfed.tasks.harmonization import mean_landmarks
    from medfed.tasks.pretrain import PretrainRecipe, save_weights

    base = get_task("tiny-seg")

    def public_standard(subjects: int, seed: int) -> tuple[np.ndarray, int]:
        data = base.load_site_data(DataSourceConfig(num_samples=subjects, seed=seed))
        return mean_landmarks(data.train, None)

    weights = tmp_path / "public" / "weights.npz"
    weights.parent.mkdir()
    torch.manual_seed(0)
    recipe = PretrainRecipe(subjects=8, seed=3)
    save_weights(weights, engine.get_weights(base.build_model()), {"recipe": vars(recipe)})
    task = dataclasses.replace(
        base, name="tiny-seg-public", public_weights=weights, public_standard=public_standard
    )
    monkeypatch.setitem(TASKS._items, task.name, task)
    monkeypatch.setitem(TASKS._origins, task.name, "test")
    return task


def test_the_public_standard_is_stored_beside_the_public_weights_and_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from medfed.core.errors import MedfedError
    from medfed.tasks.pretrain import add_public_standard, load_public_standard

    task = _task_with_public_standard(tmp_path, monkeypatch)
    with pytest.raises(MedfedError, match="has no 'standard'") as missing:
        load_public_standard(task)
    assert "--standard-only" in str(missing.value.fix)
    stored = add_public_standard(task.public_weights, task)
    expected, scans = task.public_standard(8, 3)  # the recipe's subjects and seed
    assert stored["scans"] == scans and stored["subjects"] == 8
    assert load_public_standard(task) == pytest.approx(tuple(expected), abs=1e-6)
    recipe_file = task.public_weights.with_suffix(".json")
    info = json.loads(recipe_file.read_text())
    info["standard"]["landmarks"][3] = info["standard"]["landmarks"][2]  # not increasing
    recipe_file.write_text(json.dumps(info))
    with pytest.raises(MedfedError, match="11 increasing numbers"):
        load_public_standard(task)


def test_the_shipped_brain_task_has_its_public_standard() -> None:
    from medfed.tasks import get_task
    from medfed.tasks.pretrain import load_public_standard

    values = load_public_standard(get_task("brain-tissue-seg"))
    assert len(values) == len(LANDMARK_PERCENTILES) and np.all(np.diff(values) > 0)


def test_a_dp_run_harmonizes_onto_the_public_standard_without_asking_any_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medfed.local.sim_sites import synthetic_sites
    from medfed.local.simulation import simulate
    from medfed.tasks.pretrain import add_public_standard

    task = _task_with_public_standard(tmp_path, monkeypatch)
    add_public_standard(task.public_weights, task)
    run = RunConfig.model_validate(
        {  # DP and secure aggregation: 'histogram' would be refused by every site's rules
            "task": task.name,
            "rounds": 2,
            "min_sites": 2,
            "seed": 5,
            "harmonization": "histogram-public",
            "privacy": {"mode": "sample", "noise_multiplier": 1.0, "max_grad_norm": 1.0},
        }
    )
    folder, summary = simulate(run, synthetic_sites(2), tmp_path / "runs")
    assert summary.status == "completed", summary.reason
    agreed = [e for e in folder.read_events() if e.event == "harmonization"]
    assert len(agreed) == 1 and agreed[0]["method"] == "histogram-public"
    assert agreed[0]["sites"] == []  # no site was asked for its landmarks
    expected, _ = task.public_standard(8, 3)
    assert agreed[0]["standard"] == pytest.approx(list(expected), abs=1e-6)
    train = [m for m in folder.read_metrics() if m["phase"] == "train" and m["site"] != "global"]
    assert {m["round"] for m in train} == {1, 2}


def test_the_run_options_take_the_public_standard_under_dp_where_the_task_has_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medfed.cli.run_cmd import build_run_config
    from medfed.core.errors import ConfigError, MedfedError
    from medfed.tasks.pretrain import add_public_standard

    task = _task_with_public_standard(tmp_path, monkeypatch)
    add_public_standard(task.public_weights, task)
    options = {**_RUN_OPTIONS, "harmonization": "histogram-public", "dp": "sample"}
    built = build_run_config(**{**options, "task": task.name})
    assert built.harmonization == "histogram-public" and built.privacy.mode == "sample"
    with pytest.raises(MedfedError, match="ships no public weights") as refused:
        build_run_config(**options)  # tiny-seg itself ships no public weights
    assert "histogram-public" in str(refused.value)
    with pytest.raises(ConfigError, match="histogram-public"):  # the fix names it
        build_run_config(**{**options, "harmonization": "histogram"})

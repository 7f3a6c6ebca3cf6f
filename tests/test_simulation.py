"""`medfed simulate`: the ServerApp's run over simulated sites in-process, and data partitions."""

from __future__ import annotations

import gc
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import medfed

from medfed.core.config import RunConfig
from medfed.core.errors import ConfigError
from medfed.core.runs import RunFolder
from medfed.core.wire import Frame
from medfed.data.partition import mix, partition
from medfed.local.sim_sites import PartitionSpec, partitioned_sites, synthetic_sites
from medfed.local.simulation import SITES_DIR, simulate
from medfed.local.site_processes import SiteProcesses


@pytest.fixture(autouse=True)
def _quiet_flower() -> None:
    """Flower's per-round INFO lines are the ServerApp's log, not the test's."""
    flwr = logging.getLogger("flwr")
    level = flwr.level
    flwr.setLevel(logging.WARNING)
    yield
    flwr.setLevel(level)


def tiny_run(**overrides: object) -> RunConfig:
    return RunConfig.model_validate(
        {"task": "tiny-seg", "rounds": 2, "min_sites": 3, "seed": 5, **overrides}
    )


def checkpoint(folder: RunFolder, rnd: int) -> dict[str, np.ndarray]:
    with np.load(folder.checkpoint_file(rnd)) as z:
        return {k: z[k] for k in z.files}


# ------------------------------------------------------------------------ the engine


def test_a_simulated_run_writes_the_run_folder_of_a_deployed_run(tmp_path: Path) -> None:
    folder, summary = simulate(tiny_run(secure_aggregation="off"), synthetic_sites(3), tmp_path)
    assert summary.status == "completed", summary.reason
    assert summary.engine == "simulation" and summary.simulation.sites == 3
    assert summary.sites == ["site-1", "site-2", "site-3"]
    assert summary.final_checkpoint == "round-002.npz"
    assert folder.path.parent == tmp_path and folder.read_run()["config"]["task"] == "tiny-seg"
    assert folder.checkpoint_file(1).is_file() and folder.checkpoint_file(2).is_file()
    rows = Counter((m["round"], m["site"], m["phase"]) for m in folder.read_metrics())
    for rnd in (1, 2):
        for site in ("site-1", "site-2", "site-3"):
            assert rows[(rnd, site, "train")] == rows[(rnd, site, "evaluate")] == 1
        assert rows[(rnd, "global", "evaluate")] == 1
    cross = json.loads(folder.cross_site_file.read_text())["matrix"]["global"]
    assert set(cross) == {"site-1", "site-2", "site-3"}
    assert "transport: in memory (simulation)" in folder.report_file.read_text()
    # each site kept what a deployed site keeps, in its own folder: audit, no last update
    for site in ("site-1", "site-2", "site-3"):
        home = folder.path / SITES_DIR / site
        sent = [json.loads(line) for line in (home / "audit.jsonl").read_text().splitlines()]
        assert [e["round"] for e in sent if e["event"] == "update-sent"] == [1, 2]
        assert not list((home / "privacy" / "released").glob("*.npz"))


def test_a_simulated_run_with_secure_aggregation_completes(tmp_path: Path) -> None:
    folder, summary = simulate(tiny_run(), synthetic_sites(3), tmp_path, keep_warm=0)
    assert summary.status == "completed", summary.reason
    assert summary.protection.secure_aggregation == "default"
    events = folder.read_events()
    assert [e["round"] for e in events if e["event"] == "secure-aggregation"] == [1, 2]
    for site in ("site-1", "site-2", "site-3"):
        home = folder.path / SITES_DIR / site
        audit = [json.loads(line) for line in (home / "audit.jsonl").read_text().splitlines()]
        sent = [e for e in audit if e["event"] == "update-sent"]
        assert {e["protection"] for e in sent} == {"tls+secure-aggregation/default"}
        assert not list((home / "secagg" / "sessions").glob("*"))  # the keys did not outlive it


def test_the_same_seed_gives_the_same_final_checkpoint(tmp_path: Path) -> None:
    # warm workers, one built per message, or sites in two worker processes: the same
    # training (seeds of run, round, site) and the same order of aggregation, at the
    # same number of torch threads (CPU kernels sum in an order that depends on it)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first, a = simulate(tiny_run(), synthetic_sites(4), tmp_path, keep_warm=8)
        again, b = simulate(tiny_run(), synthetic_sites(4), tmp_path, keep_warm=0)
    finally:
        torch.set_num_threads(threads)
    spread, c = simulate(tiny_run(), synthetic_sites(4), tmp_path, workers=2, threads=1)
    assert a.status == b.status == c.status == "completed"
    assert (a.simulation.engine, c.simulation.engine) == ("in-process", "processes")
    assert len({first.path, again.path, spread.path}) == 3
    x = checkpoint(first, 2)
    for other in (again, spread):
        y = checkpoint(other, 2)
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    assert a.evaluate_metrics == b.evaluate_metrics == c.evaluate_metrics
    # the worker processes ended the run at their sites, as in-process sites do
    for site in ("site-1", "site-2", "site-3", "site-4"):
        assert not list((spread.path / SITES_DIR / site / "secagg" / "sessions").glob("*"))


def test_the_server_holds_no_model_when_round_1_begins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A torch module sits in reference cycles: the models the ServerApp builds for the
    # layout and the start weights would live into round 1 (2 more copies of the
    # weights beside the round's sum) until the cyclic collector ran.
    import medfed.server.app as server_app

    def modules() -> set[int]:
        return {id(o) for o in gc.get_objects() if isinstance(o, torch.nn.Module)}

    seen: list[int] = []
    frozen: list[int] = []
    run_rounds = server_app.run_rounds

    def counting(*args: object, **kwargs: object) -> object:
        seen.append(len(modules() - before))  # the run's own modules
        frozen.append(gc.get_freeze_count())
        return run_rounds(*args, **kwargs)

    monkeypatch.setattr(server_app, "run_rounds", counting)
    gc.collect()
    before = modules()
    assert gc.get_freeze_count() == 0
    gc.disable()  # only the ServerApp's own collections run
    try:
        _, summary = simulate(
            tiny_run(secure_aggregation="off", rounds=1, min_sites=2),
            synthetic_sites(2),
            tmp_path,
        )
    finally:
        gc.enable()
    assert summary.status == "completed", summary.reason
    assert seen == [0]
    # What existed before the run was left out of its collections, and is back after it.
    assert frozen[0] > 0 and gc.get_freeze_count() == 0


def test_sites_outside_the_sampled_rounds_get_nothing(tmp_path: Path) -> None:
    run = tiny_run(
        rounds=1,
        min_sites=2,
        secure_aggregation="off",
        strategy_options={"fraction_train": 0.3, "fraction_evaluate": 0.3},
    )
    folder, summary = simulate(run, synthetic_sites(8), tmp_path, keep_warm=0)
    assert summary.status == "completed", summary.reason
    touched = {m["site"] for m in folder.read_metrics() if m["site"] != "global"}
    assert 2 <= len(touched) <= 4
    homes = {p.name for p in (folder.path / SITES_DIR).iterdir()}
    assert homes == touched  # a site that got no message has no folder, no worker


@pytest.mark.slow
def test_a_site_process_that_dies_fails_its_request_and_is_started_again(tmp_path: Path) -> None:
    sites = synthetic_sites(2)
    with SiteProcesses(tmp_path, sites, workers=1, keep_warm=0, threads=1) as procs:
        assert procs.handle(1, Frame({"op": "ping"})).header == {
            "ok": True,
            "site": "site-2",
            "metrics": {},
        }
        procs._lanes[0].process.kill()  # what an out-of-memory kill does
        lost = procs.handle(0, Frame({"op": "ping"})).header
        assert lost["ok"] is False and lost["site"] == "site-1"
        assert "process ended" in lost["reason"]
        assert procs.handle(0, Frame({"op": "ping"})).header["ok"] is True  # a new process


def test_too_few_sites_for_the_run_is_refused_up_front(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs 3 sites"):
        simulate(tiny_run(), synthetic_sites(2), tmp_path)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------ partitions


def test_a_partition_is_deterministic_and_holds_every_item_once() -> None:
    keys = ["a"] * 30 + ["b"] * 20 + ["c"] * 10
    for scheme in ("iid", "dirichlet"):
        parts = partition(keys, 5, scheme=scheme, alpha=0.3, seed=11)
        assert parts == partition(keys, 5, scheme=scheme, alpha=0.3, seed=11)
        assert parts != partition(keys, 5, scheme=scheme, alpha=0.3, seed=12)
        assert sorted(i for p in parts for i in p) == list(range(len(keys)))
    sizes = [len(p) for p in partition(keys, 7, scheme="iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1


def _dominance(keys: list[str], parts: list[list[int]]) -> float:
    """The mean share of each site's most common key (1.0: one key per site)."""
    return float(np.mean([max(m.values()) / sum(m.values()) for m in mix(keys, parts)]))


def test_dirichlet_skews_the_sites_mix_and_alpha_sets_how_much() -> None:
    keys = [k for k in "abcd" for _ in range(100)]
    iid = np.mean([_dominance(keys, partition(keys, 10, scheme="iid", seed=s)) for s in range(5)])
    skewed = np.mean(
        [
            _dominance(keys, partition(keys, 10, scheme="dirichlet", alpha=0.1, seed=s))
            for s in range(5)
        ]
    )
    mild = np.mean(
        [
            _dominance(keys, partition(keys, 10, scheme="dirichlet", alpha=100.0, seed=s))
            for s in range(5)
        ]
    )
    assert iid < 0.4 and mild < 0.4  # four keys, about a quarter each
    assert skewed > 0.7


def test_a_partition_gives_every_site_its_minimum() -> None:
    keys = ["a"] * 9 + ["b"]
    for seed in range(20):
        parts = partition(keys, 5, scheme="dirichlet", alpha=0.05, seed=seed, min_items=2)
        assert min(len(p) for p in parts) >= 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sites": 6, "min_items": 2}, "cannot be shared among 6 sites"),
        ({"sites": 2, "scheme": "label-skew"}, "Unknown partition scheme"),
        ({"sites": 2, "scheme": "dirichlet", "alpha": 0.0}, "alpha must be positive"),
    ],
)
def test_a_bad_partition_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        partition(["a"] * 10, **kwargs)


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medfed.synth import synthesize_sites

    out = tmp_path_factory.mktemp("synth") / "data"
    synthesize_sites(out, sites=2, subjects_per_site=3, seed=3)
    return out


def test_a_partitioned_site_is_a_dicom_folder_of_its_subjects(
    synth_data: Path, tmp_path: Path
) -> None:
    from medfed.data import DicomFolderSource
    from medfed.data.targets import load_targets
    from medfed.synth import read_site_manifest

    spec = PartitionSpec(sites=3, scheme="dirichlet", by="scanner", alpha=0.5, seed=1)
    sites = partitioned_sites(synth_data, tmp_path / "part", spec)
    record = json.loads((tmp_path / "part" / "partition.json").read_text())
    assert [s.name for s in sites] == ["site-1", "site-2", "site-3"]
    subjects = [record["sites"][s.name]["subjects"] for s in sites]
    assert sorted(x for part in subjects for x in part) == sorted(
        f"SYN-site{i}-00{j}" for i in (1, 2) for j in (1, 2, 3)
    )
    uid = {
        e.subject: e.series_uid
        for d in ("site-1", "site-2")
        for e in read_site_manifest(synth_data / d).series.values()
    }
    for site, held in zip(sites, subjects, strict=True):
        assert len(held) >= 2 and sum(record["sites"][site.name]["mix"].values()) == len(held)
        source = DicomFolderSource(
            Path(site.data.path),
            manifest=Path(site.data.manifest),
            cache_dir=Path(site.data.cache_dir),
        )
        found = {s.series_uid for s in source.series()}
        assert found == {uid[x] for x in held} == set(load_targets(Path(site.data.manifest)))
    # the same partition again reuses the folder; a different one is refused
    assert partitioned_sites(synth_data, tmp_path / "part", spec) == sites
    with pytest.raises(ConfigError, match="different partition"):
        partitioned_sites(
            synth_data, tmp_path / "part", PartitionSpec(sites=3, scheme="iid", seed=1)
        )


# ------------------------------------------------------------------------ the command


def test_simulate_refuses_a_partition_without_data(tmp_path: Path) -> None:
    out = medfed(
        "simulate",
        "--task",
        "tiny-seg",
        "--partition",
        "dirichlet",
        "--out",
        str(tmp_path / "runs"),
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "no --data was given" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_medfed_simulate_runs_and_compare_reads_simulated_runs(tmp_path: Path) -> None:
    out = medfed(
        "simulate",
        "--task",
        "tiny-seg",
        "--sites",
        "4",
        "--rounds",
        "2",
        "--secure-aggregation",
        "off",
        "--out",
        str(tmp_path / "runs"),
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "round 2/2" in out.stdout and "completed 2 rounds" in out.stdout
    (run,) = [p for p in (tmp_path / "runs").iterdir() if (p / "run.json").exists()]
    assert json.loads((run / "summary.json").read_text())["engine"] == "simulation"
    out = medfed(
        "compare",
        "--engine",
        "simulation",
        "--strategies",
        "fedavg,fedprox",
        "-o",
        "fedprox:proximal_mu=0.1",
        "--sites",
        "10",
        "--rounds",
        "1",
        "--out",
        str(tmp_path / "cmp"),
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["engine"] == "simulation"
    for r in result["runs"]:
        assert r["status"] == "completed" and len(r["sites"]) == 10


def test_sampled_rounds_under_secure_aggregation_need_a_threshold_below_the_sample(
    tmp_path: Path,
) -> None:
    """10 sites, 4 a round: the roster's default threshold (5) needs 6; t = 2 serves them."""
    sampled = {"fraction_train": 0.4, "fraction_evaluate": 0.4}
    run = tiny_run(rounds=1, min_sites=2, strategy_options=sampled)
    folder, summary = simulate(run, synthetic_sites(10), tmp_path / "default", keep_warm=0)
    assert summary.status != "completed"
    assert "threshold" in summary.to_json() or "threshold" in folder.events_file.read_text()
    run = tiny_run(rounds=1, min_sites=2, strategy_options=sampled, secagg_threshold=2)
    folder, summary = simulate(run, synthetic_sites(10), tmp_path / "t2", keep_warm=0)
    assert summary.status == "completed", summary.reason
    trained = {
        m["site"] for m in folder.read_metrics() if m["site"] != "global" and m["phase"] == "train"
    }
    assert len(trained) == 4


@pytest.mark.slow
def test_site_policy_from_the_command_line_lets_simulated_sites_share_landmarks(
    tmp_path: Path,
) -> None:
    common = ("simulate", "--task", "tiny-seg", "--sites", "2", "--rounds", "1")
    common += ("--harmonization", "histogram")
    refused = medfed(*common, "--out", str(tmp_path / "refused"))
    assert refused.returncode == 1
    assert "policy.share_landmarks" in refused.stdout
    assert "--site-policy KEY=VALUE" in refused.stdout
    # Through worker processes too: each process builds its sites with the policy.
    done = medfed(
        *common,
        "--site-policy",
        "share_landmarks=true",
        "--workers",
        "2",
        "--augmentation",
        "contrast",
        "--out",
        str(tmp_path / "runs"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    run_json = next((tmp_path / "runs").glob("*/run.json")).read_text()
    assert json.loads(run_json)["config"]["augmentation"] == "contrast"
    site_toml = next((tmp_path / "runs").glob("*/sites/site-1/site.toml")).read_text()
    assert "share_landmarks = true" in site_toml
    bad = medfed(*common, "--site-policy", "share_landmarks", "--out", str(tmp_path / "x"))
    assert bad.returncode != 0 and "--site-policy share_landmarks=true" in bad.stdout + bad.stderr
    unknown = medfed(
        *common, "--site-policy", "share_everything=true", "--out", str(tmp_path / "x")
    )
    assert unknown.returncode != 0 and "share_everything" in unknown.stdout + unknown.stderr


def test_a_run_whose_every_round_gave_no_model_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not "completed" with the initial model: every round lost is a failure, saying why."""
    from flwr.serverapp.strategy import FedAvg

    from medfed.strategies.registry import STRATEGIES

    class NoModel(FedAvg):
        """As if no site's update ever arrived: each round ends without a model."""

        def aggregate_train(self, server_round: int, replies: object) -> tuple[None, None]:
            return None, None

    monkeypatch.setitem(STRATEGIES._items, "no-model", NoModel)
    monkeypatch.setitem(STRATEGIES._origins, "no-model", "this test")
    run = tiny_run(strategy="no-model", secure_aggregation="off")
    folder, summary = simulate(run, synthetic_sites(3), tmp_path, workers=1)
    assert summary.status == "failed", summary
    assert summary.rounds_lost == [1, 2] and summary.final_checkpoint is None
    assert "no round gave a new model" in (summary.reason or "")
    assert [e.event for e in folder.read_events()][-1] == "run-failed"

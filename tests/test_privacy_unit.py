"""DP-SGD per scan or patient (``privacy.unit``): what epsilon protects is a whole unit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from torch.utils.data import DataLoader, TensorDataset

from medfed.client.ledger import PrivacyLedger
from medfed.client.worker import SiteWorker
from medfed.core import privacy_accounting, wire
from medfed.core.config import DataSourceConfig, RunConfig, SiteConfig, validate
from medfed.core.errors import MedfedError
from medfed.core.packing import WEIGHTS_KEY, pack
from medfed.core.privacy import DatasetBudget, RunPrivacy, check_run_against_policy
from medfed.data import DicomFolderSource
from medfed.data.headers import patient_key
from medfed.data.synthetic import SyntheticGeometry, write_series
from medfed.tasks import dp, dp_units, engine, get_task
from medfed.tasks.imaging import Subject, split_subjects, unit_indices

#: Four scans of 3, 2, 4 and 3 examples, their ids not contiguous.
SCANS = torch.tensor([5, 5, 5, 9, 9, 2, 2, 2, 2, 7, 7, 7])


def _examples(n: int, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 32, 32, generator=gen)
    return TensorDataset(x, (x > 0.6).float())


@pytest.mark.parametrize(
    ("mode", "chunk"), [("rules", 64), ("rules", 5), ("vmap", 5), ("hooks", 64)]
)
def test_each_scan_is_clipped_as_one_unit(
    mode: str, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The noiseless DP gradient is the sum over scans of each scan's clipped mean gradient.

    With chunks of 5 examples, scans are split across chunks (rules and vmap modes).
    """
    monkeypatch.setattr(dp, "PHYSICAL_BATCH", chunk)
    task = get_task("tiny-seg")
    torch.manual_seed(0)
    model, loss_fn = task.build_model(), task.build_loss()
    data = _examples(len(SCANS))
    x, y = data.tensors
    _, owner = torch.unique(SCANS, return_inverse=True)  # 0..3 in id order
    expected_norms, per_scan = [], []
    for s in range(4):
        model.zero_grad()
        loss_fn(model(x[owner == s]), y[owner == s]).backward()  # the scan's mean loss
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        per_scan.append(g)
        expected_norms.append(float(g.norm()))
    clip = sorted(expected_norms)[1] * 1.01  # two scans clipped, two not
    expected = sum(g * min(1.0, clip / (g.norm() + 1e-6)) for g in per_scan)
    model.zero_grad()
    loader = DataLoader(TensorDataset(torch.arange(4)), batch_size=2)  # q = 1/2: 2 expected
    private = dp.make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        loader,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        grad_sample_mode=mode,
        loss_fn=loss_fn,
        examples=data,
    )
    private.step(loss_fn, x, y, owner)
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    private.close()
    torch.testing.assert_close(got, expected / 2, rtol=1e-4, atol=1e-6)


def test_dp_train_per_scan_samples_and_accounts_scans() -> None:
    task = get_task("tiny-seg")
    model = task.build_model()
    data = _examples(len(SCANS))
    stats = dp.dp_train(
        task,
        model,
        data,
        epochs=2,
        batch_size=2,
        learning_rate=1e-2,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(1),
        units=SCANS,
    )
    # 4 scans at 2 per batch: q = 1/2, 2 steps per epoch; the examples still weigh FedAvg
    assert stats.history == privacy_accounting.plan_round(
        4, batch_size=2, epochs=2, noise_multiplier=1.0
    )
    assert stats.sample_rate == pytest.approx(0.5) and stats.steps == 4
    assert stats.num_examples == len(SCANS)
    assert dp_units.privacy_units(len(SCANS), {"scan": SCANS}, "scan") == 4
    assert dp_units.privacy_units(len(SCANS), {"scan": SCANS}, "sample") == len(SCANS)
    with pytest.raises(dp_units.UnitUnknown, match="train_units"):  # fail closed
        dp_units.privacy_units(len(SCANS), {"scan": SCANS}, "patient")


def test_unit_indices_that_do_not_match_the_examples_are_refused() -> None:
    task = get_task("tiny-seg")
    with pytest.raises(MedfedError, match="one unit index per training example"):
        dp.dp_train(
            task,
            task.build_model(),
            _examples(len(SCANS)),
            epochs=1,
            batch_size=2,
            learning_rate=1e-2,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            device=torch.device("cpu"),
            generator=torch.Generator().manual_seed(1),
            units=SCANS[:-1],
        )


def test_brain_tissue_seg_names_the_scan_and_patient_of_every_slice() -> None:
    data = get_task("brain-tissue-seg").load_site_data(DataSourceConfig(num_samples=32, seed=3))
    scans = data.train_units["scan"]
    assert scans.shape == (len(data.train),)
    assert len(scans.unique()) == data.description["subjects-train"]
    assert all(c > 20 for c in torch.bincount(scans).tolist())  # a scan gives many slices
    assert torch.equal(data.train_units["patient"], scans)  # one scan per synthesized patient


def test_both_copies_of_a_mirrored_lesion_scan_are_one_unit() -> None:
    data = get_task("brain-lesion-cls").load_site_data(DataSourceConfig(num_samples=32, seed=3))
    scans = data.train_units["scan"]
    assert len(data.train) == 2 * data.description["subjects-train"]
    assert torch.equal(scans, torch.arange(len(scans)) // 2)
    x, _ = data.train[:2]
    torch.testing.assert_close(x[1, :1], torch.flip(x[0, :1], dims=(1,)))  # its mirror


def _subject(key: str, patient: str) -> Subject:
    return Subject(key=key, image=MetaTensor(torch.zeros(1, 2, 2, 2)), label=None, patient=patient)


def test_a_patients_scans_share_a_unit_and_a_side_of_the_split() -> None:
    keys = [f"uid-{i}" for i in range(9)]
    patients = ["p1", "p1", "p2", "p3", "p3", "p3", "p4", "p5", "p6"]
    for seed in range(6):
        train, val = split_subjects(keys, seed=seed, val_fraction=0.34, patients=patients)
        assert sorted(train + val) == keys
        by = dict(zip(keys, patients, strict=True))
        assert not {by[k] for k in train} & {by[k] for k in val}
        assert len({by[k] for k in val}) == 2  # 34% of 6 patients
    # one scan per patient: the split without patients
    assert split_subjects(keys, seed=1, val_fraction=0.34, patients=keys) == split_subjects(
        keys, seed=1, val_fraction=0.34
    )
    subjects = [_subject(k, p) for k, p in zip(keys[:4], patients[:4], strict=True)]
    units = unit_indices(subjects, [2, 1, 3, 1])
    assert units["scan"].tolist() == [0, 0, 1, 2, 2, 2, 3]
    assert units["patient"].tolist() == [0, 0, 0, 1, 1, 1, 2]
    unknown = unit_indices([*subjects, _subject("uid-x", "")], [1, 1, 1, 1, 1])
    assert "patient" not in unknown and len(unknown["scan"]) == 5  # refused, not guessed


def test_dicom_series_carry_their_patient_id(tmp_path: Path) -> None:
    geometry = SyntheticGeometry(
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)
    )
    stored = np.zeros((4, 4, 3), dtype=np.int16)
    write_series(tmp_path / "site" / "a", stored, geometry=geometry)
    files = write_series(tmp_path / "site" / "b", stored, geometry=geometry)
    source = DicomFolderSource(tmp_path / "site", cache_dir=tmp_path / "cache")
    synth = patient_key("SYNTH")
    assert [s.patient_id for s in source.series()] == [synth, synth]
    assert synth and "SYNTH" not in synth  # a key, not the ID
    ds = pydicom.dcmread(files[0])
    ds.PatientID = "SOMEONE-ELSE"  # files of one series disagree: unknown, never guessed
    ds.save_as(files[0])
    source = DicomFolderSource(tmp_path / "site", cache_dir=tmp_path / "cache")
    assert sorted(s.patient_id for s in source.series()) == ["", synth]


def test_a_site_protecting_scans_refuses_per_slice_runs_with_the_rule() -> None:
    budget = DatasetBudget(epsilon_max=10.0, privacy_unit="scan")
    per_slice = RunPrivacy(mode="sample", noise_multiplier=1.0)
    decision = check_run_against_policy(per_slice, budget, dataset="brain")
    assert not decision.allowed
    assert decision.rule == "privacy.datasets.brain.privacy_unit"
    assert "privacy.unit = 'scan'" in decision.reason
    per_patient = DatasetBudget(epsilon_max=10.0, privacy_unit="patient")
    per_scan = per_slice.model_copy(update={"unit": "scan"})
    assert not check_run_against_policy(per_scan, per_patient, dataset="brain").allowed
    assert check_run_against_policy(
        per_scan.model_copy(update={"unit": "patient"}), per_patient, dataset="brain"
    ).allowed
    for allowed in (
        per_slice.model_copy(update={"unit": "scan"}),
        RunPrivacy(mode="update", noise_multiplier=1.0),
    ):  # the whole update
        assert check_run_against_policy(allowed, budget, dataset="brain").allowed
    assert check_run_against_policy(
        per_slice, DatasetBudget(epsilon_max=10.0), dataset="brain"
    ).allowed  # the default: per example


def _worker(tmp: Path) -> SiteWorker:
    cfg = validate(
        SiteConfig,
        {
            "site": {"name": "site-x"},
            "data": {"num_samples": 32, "seed": 3},
            "privacy": {
                "default": "brain",
                "datasets": {"brain": {"epsilon_max": 50.0, "privacy_unit": "scan"}},
            },
            "compute": {"threads": 1},
        },
        where="test",
    )
    return SiteWorker(cfg, tmp / "site.toml")


def _train(worker: SiteWorker, run: RunConfig) -> wire.Frame:
    torch.manual_seed(0)
    weights = {WEIGHTS_KEY: pack(engine.get_weights(get_task(run.task).build_model()))}
    return worker.handle(
        wire.Frame(
            {
                "op": "train",
                "run_id": 7,
                "config": {wire.RUN_CONFIG_KEY: run.to_json(), wire.SERVER_ROUND_KEY: 1},
            },
            weights,
        )
    )


def _per_scan_run(task: str) -> RunConfig:
    return RunConfig(
        secure_aggregation="off",
        task=task,
        batch_size=1,
        privacy={"mode": "sample", "noise_multiplier": 1.0, "unit": "scan"},
    )


def test_a_per_scan_round_is_charged_per_scan_at_the_site(tmp_path: Path) -> None:
    worker = _worker(tmp_path)
    run = _per_scan_run("brain-tissue-seg")
    reply = _train(worker, run)
    assert reply.header["ok"], reply.header
    scans = len(worker.data_for(get_task(run.task)).train_units["scan"].unique())
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    eps, _ = get_privacy_spent(
        orders=orders,
        delta=1e-5,
        rdp=compute_rdp(q=1 / scans, noise_multiplier=1.0, steps=scans, orders=orders),
    )
    assert reply.header["metrics"]["epsilon-run"] == pytest.approx(eps, rel=1e-6)
    audit = [r for r in worker.audit.read() if r["event"] == "update-sent"][-1]
    assert audit["privacy"]["unit"] == "scan"
    assert audit["privacy"]["sample_rate"] == pytest.approx(1 / scans)


def test_a_task_that_does_not_name_its_scans_is_refused_per_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = _worker(tmp_path)
    data = worker.data_for(get_task("tiny-seg"))
    monkeypatch.setattr(worker, "data_for", lambda task: dataclasses.replace(data, train_units={}))
    reply = _train(worker, _per_scan_run("tiny-seg"))
    assert reply.header["status"] == "refused" and reply.header["rule"] == "privacy.unit"
    assert "train_units" in reply.header["reason"] and not reply.arrays
    assert PrivacyLedger(tmp_path / "privacy" / "ledger.sqlite").spent("brain") == 0.0


def test_raising_privacy_unit_after_per_slice_spends_refuses_the_dataset(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "privacy" / "ledger.sqlite")
    ledger.reserve(
        "earlier",
        1,
        "brain",
        budget=DatasetBudget(epsilon_max=50.0),
        round_history=[(1.0, 0.1, 10)],
        delta=1e-5,
    )  # per slice, before the change
    spent = ledger.spent("brain")
    reply = _train(_worker(tmp_path), _per_scan_run("brain-tissue-seg"))  # now privacy_unit=scan
    assert reply.header["status"] == "refused", reply.header
    assert reply.header["rule"] == "privacy.datasets.brain.privacy_unit"
    assert "per sample" in reply.header["reason"] and not reply.arrays
    assert ledger.spent("brain") == pytest.approx(spent)

"""A round the server lost after the site sent it: the same update again, charged once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medfed.client.ledger import PrivacyLedger
from medfed.core import wire
from medfed.core.packing import WEIGHTS_KEY
from medfed.core.schema import SiteInstruction
from tests.test_worker_privacy import dp_run, make_worker, train_request


def _resumed(request: wire.Frame) -> wire.Frame:
    """The request as the resumed run sends it: a new server run id, resume_of set."""
    from medfed.core.config import RunConfig

    config = dict(request.header["config"])
    run = RunConfig.from_json(config[wire.RUN_CONFIG_KEY])
    config[wire.RUN_CONFIG_KEY] = run.model_copy(update={"resume_of": "42"}).to_json()
    return wire.Frame({**request.header, "run_id": 4242, "config": config}, request.arrays)


def test_the_resumed_run_gets_the_same_dp_update_and_the_ledger_charges_once(
    tmp_path: Path,
) -> None:
    worker = make_worker(tmp_path)
    first = worker.handle(train_request(dp_run(), rnd=2))
    assert first.header["ok"], first.header
    again = worker.handle(_resumed(train_request(dp_run(), rnd=2)))
    assert again.header["ok"], again.header
    np.testing.assert_array_equal(again.arrays[WEIGHTS_KEY], first.arrays[WEIGHTS_KEY])
    assert again.header["metrics"] == first.header["metrics"]
    ledger = PrivacyLedger(tmp_path / "privacy" / "ledger.sqlite")
    spends = ledger.history("brain")
    assert [(s.run_id, s.round, s.resent) for s in spends] == [("42", 2, 1)]
    sent = [r for r in worker.audit.read() if r["event"] == "update-sent"]
    assert [r.get("resent", False) for r in sent] == [False, True]
    assert sent[1]["privacy"]["ledger_record"] == sent[0]["privacy"]["ledger_record"]
    assert worker.audit.verify().intact
    # the next round of the resumed run trains and is charged as usual
    nxt = worker.handle(_resumed(train_request(dp_run(), rnd=3)))
    assert nxt.header["ok"] and [s.round for s in ledger.history("brain")] == [2, 3]


def test_another_model_or_configuration_is_trained_and_charged_anew(tmp_path: Path) -> None:
    worker = make_worker(tmp_path)
    assert worker.handle(train_request(dp_run(), rnd=2)).header["ok"]
    request = train_request(dp_run(), rnd=2)
    request.arrays[WEIGHTS_KEY] = request.arrays[WEIGHTS_KEY] + 1e-3  # not the model it had
    assert worker.handle(_resumed(request)).header["ok"]
    other = dp_run(noise_multiplier=1.5)  # nor the same run configuration
    assert worker.handle(_resumed(train_request(other, rnd=2))).header["ok"]
    spends = PrivacyLedger(tmp_path / "privacy" / "ledger.sqlite").history("brain")
    assert [(s.round, s.resent) for s in spends] == [(2, 0), (2, 0), (2, 0)]


def test_the_kept_update_goes_when_the_run_ends(tmp_path: Path) -> None:
    worker = make_worker(tmp_path)
    run = dp_run().model_copy(update={"rounds": 1})
    assert worker.handle(train_request(run, rnd=1)).header["ok"]
    kept = list((tmp_path / "privacy" / "released").glob("*.npz"))
    assert len(kept) == 1
    request = train_request(run, rnd=1)
    evaluate = wire.Frame({**request.header, "op": "evaluate"}, request.arrays)
    assert worker.handle(evaluate).header["ok"]
    assert not kept[0].exists()


def test_an_update_is_sent_again_only_to_the_same_participants(tmp_path: Path) -> None:

    from medfed.client.released import (
        Released,
        ReleasedUpdates,
        model_digest,
        participants_of,
        run_digest,
    )
    from medfed.core.config import RunConfig

    run = RunConfig(task="tiny-seg")
    store = ReleasedUpdates(tmp_path)
    model = np.arange(4, dtype=np.float32)
    store.save(
        "7",
        Released(
            2,
            run_digest(run),
            model_digest(model),
            ("site-a", "site-b"),
            np.ones(3, dtype=np.float32),
            5.0,
            {},
            {},
        ),
    )
    same = participants_of(SiteInstruction(participants=("site-b", "site-a")))
    other = participants_of(SiteInstruction(participants=("site-a", "site-c")))
    assert store.matching("7", run, 2, model, same) is not None
    # summed with another site, the same update would let the server subtract two sums
    assert store.matching("7", run, 2, model, other) is None
    assert store.matching("7", run, 3, model, same) is None
    store.forget("7")
    assert store.matching("7", run, 2, model, same) is None


def test_the_kept_vector_is_read_only_for_the_round_it_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each train asks for a release; the file then holds the round before (a model's size)."""
    from medfed.client.released import Released, ReleasedUpdates, model_digest, run_digest
    from medfed.core.config import RunConfig

    run = RunConfig(task="tiny-seg")
    store = ReleasedUpdates(tmp_path)
    model = np.arange(4, dtype=np.float32)
    store.save(
        "7",
        Released(2, run_digest(run), model_digest(model), (), np.ones(3, np.float32), 5.0, {}, {}),
    )
    read: list[str] = []
    real = np.lib.npyio.NpzFile.__getitem__

    def spy(self: np.lib.npyio.NpzFile, key: str) -> np.ndarray:
        read.append(key)
        return real(self, key)

    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", spy)
    assert store.matching("7", run, 3, model, ()) is None
    assert store.matching("7", run, 2, model + 1, ()) is None
    assert "vector" not in read
    found = store.matching("7", run, 2, model, ())
    assert found is not None and read[-1] == "vector"
    np.testing.assert_array_equal(found.vector, np.ones(3, np.float32))

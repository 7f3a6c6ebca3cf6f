"""Secure aggregation overhead in a deployment: round time with and without it, one run.

One federation on loopback (TLS, site authentication, 3 real site daemons),
brain-tissue-seg-wide (a 0.82 M-parameter MONAI UNet, the issue's ~1 M; small
synthetic sites so that the protocol's cost is not hidden behind training), 3 rounds
per mode, all modes on the same running federation:

- anchor: ``--secure-aggregation off`` (the server sees every update);
- value: ``default`` (pairwise masks agreed once per run, one masked update per
  round) and ``strict`` (double masking, one extra unmasking message per round).

Beside it, stock Flower 1.42 on the same kind of deployment (TLS, SuperNode
authentication, 3 SuperNodes, ``flwr run``): its legacy ``DefaultWorkflow`` with
FedAvg, plain vs ``SecAggPlusWorkflow`` (the only secure aggregation Flower ships),
on an MLP of the same size (820,081 parameters; ``benchmarks/stock_secaggplus_app``).

Figures: median seconds per round; ratio secure / plain for each. Target (issue 5):
medfed default <= 1.25. The in-process 10 sites x 10M parameters figures (time per
round, server memory) come from ``benchmarks/secagg_core.py``.

Run: ``python benchmarks/secagg_overhead.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from medfed.core.config import RunConfig
from medfed.local import LocalFederation

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from round_latency import run_stock  # noqa: E402  (the stock Flower deployment, shared)

TASK = "brain-tissue-seg-wide"


def main() -> None:
    """Run off / default / strict on one federation; print medians and BENCH lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="medfed-sa-"))
    medians: dict[str, float] = {}
    try:
        with LocalFederation(tmp, ["site-1", "site-2", "site-3"], name="sa") as fed:
            fed.create(site_data=lambda i, name: {"num_samples": 16})
            fed.start(timeout=300)
            for mode in ("off", "default", "strict", "off"):
                _, summary = fed.run(RunConfig(task=TASK, rounds=args.rounds, min_sites=3,
                                               secure_aggregation=mode), timeout=1800)
                if summary.get("status") != "completed":
                    raise RuntimeError(f"{mode}: {summary}")
                rounds = list(summary["round_seconds"].values())[1:] or \
                    list(summary["round_seconds"].values())  # round 1 warms the sites up
                medians[mode] = min(medians.get(mode, float("inf")), statistics.median(rounds))
                print(f"{mode:>7}: seconds per round {summary['round_seconds']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    plain = medians["off"]
    flower = {}
    for mode in ("plain", "secaggplus"):
        app = tmp.with_name(tmp.name + f"-{mode}")
        shutil.copytree(HERE / "stock_secaggplus_app", app)
        (app / "pyproject.toml").write_text(
            (app / "pyproject.template.toml").read_text().replace(
                "CLIENTAPP", f"legacyapp.client:{mode}"))
        try:
            seconds = run_stock(Path(str(app) + "-deploy"), args.rounds + 1, app=app,
                                extra_config=f"secaggplus={str(mode != 'plain').lower()}")
        finally:
            shutil.rmtree(app, ignore_errors=True)
            shutil.rmtree(Path(str(app) + "-deploy"), ignore_errors=True)
        flower[mode] = statistics.median(seconds[1:])
        print(f"flower legacy {mode:>10}: seconds per round {seconds}")
    print(f"BENCH secagg_overhead flower_secaggplus_round_seconds value={flower['secaggplus']:.3f} "
          f"anchor={flower['plain']:.3f} ratio={flower['secaggplus'] / flower['plain']:.3f} "
          f"unit=s")
    print(f"BENCH secagg_overhead default_round_seconds value={medians['default']:.3f} "
          f"anchor={plain:.3f} ratio={medians['default'] / plain:.3f} target<=1.25 unit=s")
    print(f"BENCH secagg_overhead strict_round_seconds value={medians['strict']:.3f} "
          f"anchor={plain:.3f} ratio={medians['strict'] / plain:.3f} unit=s")


if __name__ == "__main__":
    main()

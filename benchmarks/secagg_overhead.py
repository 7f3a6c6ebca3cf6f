"""Secure aggregation overhead in a deployment: round time with and without it, one run.

One federation on loopback (TLS, site authentication, 5 real site daemons), a
10M-parameter model (``tiny-seg-10m``: tiny-seg padded to 10M parameters, so that
the protocol's cost on a real-size update is not hidden behind training; ``--params
0`` uses ``brain-tissue-seg-wide``, 0.82M, the earlier workload), 6 rounds per mode
of which the first (the sites' warm-up) is left out: medians of 5 rounds. All modes
run on the same running federation:

- anchor: ``--secure-aggregation off`` (the server sees every update), run first
  and last (the faster of its two medians, so that the anchor is not handicapped);
- value: ``default`` (pairwise masks agreed once per run, one masked update per
  round) and ``strict`` (double masking, one extra unmasking message per round).

The run's key set-up (the join query in which every site advertises its per-run
key, before round 1: from ``run-started`` to ``secure-aggregation-ready`` in the
run's events) is reported on its own, and amortized over the rounds the run
serves: value = median round seconds + set-up seconds / rounds.

With ``--with-flower``, stock Flower 1.42 on the same kind of deployment (TLS,
SuperNode authentication, ``flwr run``) too: its legacy ``DefaultWorkflow`` with
FedAvg, plain vs ``SecAggPlusWorkflow`` (the only secure aggregation Flower ships),
on an MLP of 820,081 parameters (``benchmarks/stock_secaggplus_app``).

Figures: seconds per round; ratio secure / plain. Targets (issue 21): default <=
1.25, strict <= 1.5. The in-process server-side figures come from
``benchmarks/secagg_core.py`` and ``benchmarks/aggregation.py``.

Run: ``python benchmarks/secagg_overhead.py [--rounds N] [--sites N] [--params 10M|0]
[--with-flower]``.
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
from round_latency import parse_params, run_stock  # noqa: E402  (shared with it)

TASKS = {10_000_000: "tiny-seg-10m", 0: "brain-tissue-seg-wide"}


def _setup_seconds(events: list[dict]) -> float:
    """Seconds from the run's start to its secure-aggregation key set-up being done."""
    from datetime import datetime

    when = {
        e["event"]: datetime.fromisoformat(e["time"]).timestamp()
        for e in events
        if e["event"] in ("run-started", "secure-aggregation-ready")
    }
    if "secure-aggregation-ready" not in when:
        return 0.0
    return when["secure-aggregation-ready"] - when["run-started"]


def main() -> None:
    """Run off / default / strict on one federation; print medians and BENCH lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="per mode; the first is left out")
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument(
        "--params",
        type=parse_params,
        default=10_000_000,
        help="10M (tiny-seg-10m) or 0 (brain-tissue-seg-wide, 0.82M)",
    )
    parser.add_argument(
        "--with-flower",
        action="store_true",
        help="also stock Flower's SecAgg+ (820k-parameter MLP)",
    )
    args = parser.parse_args()
    if args.params not in TASKS:
        parser.error("--params: 10M or 0")
    task = TASKS[args.params]
    tmp = Path(tempfile.mkdtemp(prefix="medfed-sa-"))
    medians: dict[str, float] = {}
    setup: dict[str, float] = {}
    names = [f"site-{i + 1}" for i in range(args.sites)]
    print(f"{task}, {args.sites} sites, {args.rounds} rounds per mode (round 1 left out)")
    try:
        with LocalFederation(tmp, names, name="sa") as fed:
            fed.create(site_data=lambda i, name: {"num_samples": 16})
            fed.start(timeout=300)
            for mode in ("off", "default", "strict", "off"):
                folder, summary = fed.run(
                    RunConfig(
                        task=task, rounds=args.rounds, min_sites=args.sites, secure_aggregation=mode
                    ),
                    timeout=1800,
                )
                if summary.status != "completed":
                    raise RuntimeError(f"{mode}: {summary}")
                rounds = list(summary.round_seconds.values())[1:] or list(
                    summary.round_seconds.values()
                )  # round 1 warms the sites up
                medians[mode] = min(medians.get(mode, float("inf")), statistics.median(rounds))
                setup[mode] = _setup_seconds(folder.read_events())
                print(
                    f"{mode:>7}: seconds per round {summary.round_seconds}, key set-up "
                    f"{setup[mode]:.2f} s"
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    plain = medians["off"]
    if args.with_flower:
        _flower(args.rounds, tmp)
    for mode, target in (("default", 1.25), ("strict", 1.5)):
        amortized = medians[mode] + setup[mode] / args.rounds
        print(
            f"BENCH secagg_overhead {mode}_round_seconds value={amortized:.3f} "
            f"anchor={plain:.3f} ratio={amortized / plain:.3f} target<={target} unit=s"
        )
        print(
            f"BENCH secagg_overhead {mode}_key_setup_seconds value={setup[mode]:.3f} "
            f"anchor={plain:.3f} ratio={setup[mode] / plain:.3f} target>=0 unit=s"
        )


def _flower(rounds: int, tmp: Path) -> None:
    """Stock Flower's legacy plain vs SecAgg+ rounds (820k-parameter MLP, 3 SuperNodes)."""
    flower = {}
    for mode in ("plain", "secaggplus"):
        app = tmp.with_name(tmp.name + f"-{mode}")
        shutil.copytree(HERE / "stock_secaggplus_app", app)
        (app / "pyproject.toml").write_text(
            (app / "pyproject.template.toml")
            .read_text()
            .replace("CLIENTAPP", f"legacyapp.client:{mode}")
        )
        try:
            seconds = run_stock(
                Path(str(app) + "-deploy"),
                rounds,
                app=app,
                extra_config=f"secaggplus={str(mode != 'plain').lower()}",
            )
        finally:
            shutil.rmtree(app, ignore_errors=True)
            shutil.rmtree(Path(str(app) + "-deploy"), ignore_errors=True)
        flower[mode] = statistics.median(seconds[1:])
        print(f"flower legacy {mode:>10}: seconds per round {seconds}")
    print(
        f"BENCH secagg_overhead flower_secaggplus_round_seconds value={flower['secaggplus']:.3f} "
        f"anchor={flower['plain']:.3f} ratio={flower['secaggplus'] / flower['plain']:.3f} "
        f"target>=0 unit=s"
    )


if __name__ == "__main__":
    main()

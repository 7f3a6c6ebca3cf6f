"""Recovery: how long a run stands still after the server is killed, and what it redoes.

One federation on 127.0.0.1 (TLS, site authentication, secure aggregation on,
3 site daemons): a run of ``--rounds`` rounds of FedAvg; in round ``--crash-round``,
once its training messages are out, the SuperLink is killed (SIGKILL to its process
group; its SuperExec and the run's ServerApp end with it), and ``start_superlink``
starts the server again, which resumes the run (``medfed.server.resume``). This
process plays ``medfed server start``, which does the same when its SuperLink dies
(``medfed.server.superlink.keep_running``) and, like this process, keeps a warm spare
ServerApp that outlives the SuperLink (``medfed.server.serverapp_spare``). If the
whole server machine restarts, the resumed ServerApp starts cold (5-8 s more here).

Figures (one line each):

- ``resume_seconds``: value = wall seconds from the restart (before the SuperLink
  starts) to the end of the first round the resumed run completes (the interrupted
  round, redone); anchor = the median seconds of the same run's other rounds (from
  its ``round-finished`` events, >= 5 rounds); ratio = how many rounds' worth the
  crash cost. Target (issue 20): <= 3. The one-time parts are printed beside it:
  the SuperLink's start, the resumed ServerApp's start (the warm spare taking the
  run), the secure-aggregation join, and the redone round.
- ``rounds_redone``: value = rounds trained more than once besides the interrupted
  one; anchor = the run's rounds; ratio = the fraction redone. Target: 0.

Workload: task ``brain-tissue-seg`` (a 2D MONAI UNet) on the synthesized brain MRI
benchmark, 6 subjects per site, by default (rounds of about 6 s on a 2-core machine);
``--task tiny-seg`` (rounds of about 4.5 s) with ``--quick``. Both rounds are far
shorter than a hospital's, so the fixed cost of a restart (the SuperLink's start, the
resumed ServerApp's start, the secure-aggregation join) weighs as heavily as it can.

Run: ``python benchmarks/recovery.py [--quick] [--task T] [--rounds N] [--crash-round K]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from medfed.core.config import RunConfig
from medfed.core.runs import RunFolder
from medfed.local import LocalFederation
from medfed.server.follow import follow_run
from medfed.server.superlink import start_superlink

SITES = ["site-1", "site-2", "site-3"]


def _at(event: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(event["time"]).timestamp()


def _first(events: list[dict[str, Any]], kind: str, after: float, **match: Any) -> dict[str, Any]:
    for e in events:
        if e["event"] == kind and _at(e) >= after and all(e.get(k) == v for k, v in match.items()):
            return e
    raise RuntimeError(f"no {kind} event {match} after the restart")


def measure(
    root: Path, *, task: str, rounds: int, crash_round: int, samples: int
) -> dict[str, Any]:
    """Run, crash, restart, follow; return the timings read from the run's events."""
    fed = LocalFederation(root, SITES, name="recovery")
    if task == "tiny-seg":

        def data(i: int, name: str) -> dict[str, Any]:
            return {"num_samples": samples}
    else:  # the synthesized brain MRI benchmark, as DICOM folders
        from medfed.synth import synthesize_sites

        synthesize_sites(root / "data", sites=len(SITES), subjects_per_site=samples, seed=1)

        def data(i: int, name: str) -> dict[str, Any]:
            site = root / "data" / f"site-{i + 1}"
            return {
                "kind": "dicom-folder",
                "path": str(site / "dicom"),
                "manifest": str(site / "manifest.json"),
            }

    config = RunConfig(task=task, rounds=rounds, min_sites=len(SITES), seed=1, round_timeout_s=600)
    with fed:
        fed.create(site_data=data)
        fed.start(timeout=300)
        with fed.control() as control:
            run_id = control.submit(config)
        folder = RunFolder(fed.fed.runs_dir / str(run_id))
        while not any(
            e["event"] == "round-sent" and e["round"] == crash_round and e["phase"] == "train"
            for e in folder.read_events()
        ):
            time.sleep(0.05)
        superlink = fed.group.members[0]
        os.killpg(superlink.proc.pid, signal.SIGKILL)
        superlink.proc.wait(timeout=10)
        restart = time.time()
        fed.group.members[0] = start_superlink(fed.fed)
        server_up = time.time()
        with fed.control() as control:
            summary = follow_run(
                control, run_id, fed.fed.runs_dir, on_event=lambda e: None, timeout=3600
            )
    if summary.status != "completed":
        raise RuntimeError(f"the resumed run did not complete: {summary}")
    events = folder.read_events()
    resumed = _first(events, "run-resumed", restart)
    joined = _first(events, "secure-aggregation-ready", restart)
    redone = _first(events, "round-finished", restart)
    others = [
        e["seconds"]
        for e in events
        if e["event"] == "round-finished" and e["round"] != redone["round"]
    ]
    trained = [e["round"] for e in events if e["event"] == "round-sent" and e["phase"] == "train"]
    extra = sum(trained.count(r) - 1 for r in set(trained)) - 1  # the interrupted one is due
    return {
        "resume_seconds": _at(redone) - restart,
        "median_round": statistics.median(others),
        "rounds_median": len(others),
        "server_start": server_up - restart,
        "serverapp_start": _at(resumed) - server_up,
        "join": _at(joined) - _at(resumed),
        "redone_round": _at(redone) - _at(joined),
        "resumed_at": resumed["round"],
        "extra_rounds": extra,
        "rounds": rounds,
    }


def main() -> int:
    """Parse the options, measure, print the figures and the BENCH lines."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny-seg, 7 rounds")
    p.add_argument("--task", default=None, help="brain-tissue-seg (default) or tiny-seg")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--crash-round", type=int, default=3)
    args = p.parse_args()
    task = args.task or ("tiny-seg" if args.quick else "brain-tissue-seg")
    rounds = args.rounds or (7 if args.quick else 8)
    if rounds - 1 < 5:
        p.error("--rounds must leave >= 5 rounds besides the redone one for the median")
    samples = 24 if task == "tiny-seg" else 6
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="mf-rec-", dir="/tmp") as tmp:
        r = measure(
            Path(tmp), task=task, rounds=rounds, crash_round=args.crash_round, samples=samples
        )
    ratio = r["resume_seconds"] / r["median_round"]
    print(
        f"task {task}, {rounds} rounds, 3 sites, secure aggregation on; server killed in "
        f"round {args.crash_round}, resumed at round {r['resumed_at']}"
    )
    print(
        f"  restart -> redone round finished: {r['resume_seconds']:.2f} s = "
        f"{ratio:.2f} rounds' worth (median round {r['median_round']:.2f} s over "
        f"{r['rounds_median']} rounds)"
    )
    print(
        f"    SuperLink start {r['server_start']:.2f} s, resumed ServerApp start "
        f"{r['serverapp_start']:.2f} s, secure-aggregation join {r['join']:.2f} s, "
        f"redone round {r['redone_round']:.2f} s"
    )
    print(f"  rounds trained more than once besides the interrupted one: {r['extra_rounds']}")
    print(
        f"BENCH recovery resume_seconds value={r['resume_seconds']:.3f} "
        f"anchor={r['median_round']:.3f} ratio={ratio:.3f} target<=3 unit=rounds"
    )
    print(
        f"BENCH recovery rounds_redone value={r['extra_rounds']} anchor={rounds} "
        f"ratio={r['extra_rounds'] / rounds:.3f} target<=0 unit=fraction"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Secure-aggregation core cost: 10 sites x 10M parameters, in one process, no transport.

What is timed (median of ``--repeats`` rounds, after one warm-up round):

- value (``round_time``): the secure round's compute on its critical path =
  the slowest site's ``SiteSession.mask_update`` (quantize + weight, 9 pairwise
  ChaCha20 masks, SHA-256, Ed25519 signature; sites run in parallel in a real
  federation) + the server's work for all 10 updates (verify digest and signature,
  add mod 2**32) and ``result`` (decode the weighted mean). Default mode, no dropout.
  ``round_critical_path`` counts only the server work left after the LAST update
  arrives (a server verifies and adds each update as it comes in).
- anchor: plain FedAvg's server work on the same float32 updates: numpy weighted
  average (float64 accumulator, in place). The plain site does no extra work.

This is the core's compute only: training, serialisation and transport are not in
it, so the ratio here is NOT the deployment round-time ratio of issue 5 (that is
``benchmarks/secagg_overhead.py``, where a training round of seconds to minutes
and 40 MB uploads dominate). Read the absolute seconds: they are what secure
aggregation adds per round on top of plain FedAvg.

Also reported: the cost of a dropout (one of 10 sites; reveals + regenerating 9
masks at the server), strict mode, and the server's peak traced memory during
aggregation (tracemalloc; the inputs already exist) against the plain anchor.

Run: ``python benchmarks/secagg_core.py [--size N] [--sites N] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc

import numpy as np

from medfed.core.secagg import Aggregator, Roster, SecAggConfig, SiteIdentity, SiteSession


def build(n: int, size: int, mode: str) -> tuple[dict[str, SiteSession], Aggregator, list[str]]:
    """Sessions with an accepted roster and a server aggregator."""
    cfg = SecAggConfig(mode=mode)  # type: ignore[arg-type]
    ids = [f"site-{i:02d}" for i in range(n)]
    idents = {s: SiteIdentity.generate() for s in ids}
    directory = {s: i.public_bytes for s, i in idents.items()}
    sessions = {s: SiteSession(s, idents[s], cfg, "bench", directory=directory) for s in ids}
    roster = Roster.of("bench", [sessions[s].advertise() for s in ids])
    for s in ids:
        sessions[s].accept_roster(roster)
    return sessions, Aggregator(cfg, "bench", roster, directory=directory, size=size), ids


def plain_average(xs: list[np.ndarray], ws: list[float]) -> np.ndarray:
    """The anchor: weighted mean of float32 vectors, float64 accumulator, in place."""
    acc = np.zeros(xs[0].size, dtype=np.float64)
    tmp = np.empty_like(acc)
    for x, w in zip(xs, ws, strict=True):
        np.multiply(x, np.float64(w), out=tmp)
        acc += tmp
    acc /= sum(ws)
    return acc.astype(np.float32)


def secure_round(
    sessions: dict[str, SiteSession],
    agg: Aggregator,
    ids: list[str],
    rnd: int,
    xs: list[np.ndarray],
    ws: list[float],
    dropped: int = 0,
    trace: bool = False,
) -> dict[str, float]:
    """One round; returns site and server seconds (and server peak bytes if traced)."""
    agg.begin_round(rnd)
    senders = ids[: len(ids) - dropped]
    site_times, ups = [], []
    for s, x, w in zip(ids, xs, ws, strict=True):
        if s not in senders:
            continue
        t = time.perf_counter()
        ups.append(sessions[s].mask_update(rnd, x, w))
        site_times.append(time.perf_counter() - t)
    if trace:
        tracemalloc.start()
    t = time.perf_counter()
    for u in ups[:-1]:
        agg.add(u)
    t_last = time.perf_counter()
    agg.add(ups[-1])
    status = agg.close_collection(rnd, deadline_passed=True)
    t_end = time.perf_counter()
    t_collect, t_tail = t_end - t, t_end - t_last
    reveals = {k: sessions[k].reveal(req) for k, req in status.unmask.items()}  # site side
    t2 = time.perf_counter()
    for r in reveals.values():
        agg.add_reveal(r)
    agg.result(rnd)
    t_unmask = time.perf_counter() - t2
    out = {"site": max(site_times), "server": t_collect + t_unmask, "tail": t_tail + t_unmask}
    if trace:
        out["peak"] = float(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    del ups
    return out


def main() -> None:
    """Run the benchmark and print BENCH lines."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=10_000_000)
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n, d = args.sites, args.size
    rng = np.random.default_rng(0)
    xs = [(rng.standard_normal(d) * 0.01).astype(np.float32) for _ in range(n)]
    ws = [float(w) for w in rng.integers(100, 5000, n)]

    plain = []
    for _ in range(args.repeats + 1):
        t = time.perf_counter()
        plain_average(xs, ws)
        plain.append(time.perf_counter() - t)
    anchor = statistics.median(plain[1:])
    tracemalloc.start()
    plain_average(xs, ws)
    plain_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    results: dict[str, dict[str, float]] = {}
    for mode, dropped in (("default", 0), ("default", 1), ("strict", 0)):
        sessions, agg, ids = build(n, d, mode)
        runs = [
            secure_round(sessions, agg, ids, r, xs, ws, dropped) for r in range(1, args.repeats + 2)
        ]
        traced = secure_round(sessions, agg, ids, args.repeats + 2, xs, ws, dropped, trace=True)
        med = {k: statistics.median(r[k] for r in runs[1:]) for k in ("site", "server", "tail")}
        med["peak"] = traced["peak"]
        results[f"{mode}-drop{dropped}"] = med
        print(
            f"# {mode:7s} dropped={dropped}: slowest site mask_update {med['site']:.3f} s, "
            f"server {med['server']:.3f} s (after the last arrival {med['tail']:.3f} s), "
            f"peak {med['peak'] / 2**20:.0f} MiB"
        )
    print(f"# plain weighted average (anchor): {anchor:.3f} s, peak {plain_peak / 2**20:.0f} MiB")
    base = results["default-drop0"]
    value = base["site"] + base["server"]
    tag = f"{n}x{d // 1_000_000}M" if d >= 1_000_000 else f"{n}x{d}"
    print(
        f"BENCH secagg_core round_time_{tag} value={value:.3f} anchor={anchor:.3f} "
        f"ratio={value / anchor:.2f} target<=1.25 unit=s"
    )
    crit = base["site"] + base["tail"]
    print(
        f"BENCH secagg_core round_critical_path_{tag} value={crit:.3f} anchor={anchor:.3f} "
        f"ratio={crit / anchor:.2f} unit=s"
    )
    print(f"BENCH secagg_core site_mask_time_{tag} value={base['site']:.3f} unit=s")
    drop = results["default-drop1"]
    print(
        f"BENCH secagg_core round_time_1dropout_{tag} "
        f"value={drop['site'] + drop['server']:.3f} anchor={anchor:.3f} "
        f"ratio={(drop['site'] + drop['server']) / anchor:.2f} unit=s"
    )
    strict = results["strict-drop0"]
    print(
        f"BENCH secagg_core round_time_strict_{tag} "
        f"value={strict['site'] + strict['server']:.3f} anchor={anchor:.3f} "
        f"ratio={(strict['site'] + strict['server']) / anchor:.2f} unit=s"
    )
    print(
        f"BENCH secagg_core server_peak_mem_{tag} value={base['peak'] / 2**20:.1f} "
        f"anchor={plain_peak / 2**20:.1f} ratio={base['peak'] / plain_peak:.2f} unit=MiB"
    )


if __name__ == "__main__":
    main()

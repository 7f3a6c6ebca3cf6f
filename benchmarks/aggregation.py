"""Server aggregation of one round: 50 updates x 10M float32 parameters, in one process.

Each update arrives as a site's reply does at the ServerApp: the ``.npy`` bytes of a
Flower ``Array`` (made outside the timer from a seeded generator, one at a time for
the streaming paths). Four ways to aggregate the same round, each in a process of
its own (so that its peak memory is its own):

- ``numpy`` (the anchor): the one-pass loop ``np.add(acc, x, out=acc)`` over the
  updates as they arrive (unweighted: a lower bound on the work of any mean), then
  one division.
- ``medfed``: the server's plain path, :class:`medfed.server.streaming_mean.StreamingMean`
  around Flower's FedAvg: each reply folded into a float32 weighted sum as it
  arrives (read in place, then let go), the mean handed back as a Flower ``Array``.
- ``flower``: Flower 1.42's ``aggregate_arrayrecords`` (what its FedAvg calls) over all
  50 replies, which it needs at once.
- ``secure``: the server's secure-aggregation path (default mode, no dropout): each
  masked update's signed header checked (Ed25519), its 32-bit words added mod 2**32 while
  their digest (BLAKE3 of 1 MiB segments) is checked, in one pass on every core, then
  the sum decoded into the mean. The masked vectors are random words with
  valid signed headers: masking 50 x 10M values at 50 sites is site work, and the
  server's work does not depend on the words (the decoded mean is then noise).
  With no dropout, default mode needs no unmasking; a dropout adds one mask
  regeneration per survivor (``benchmarks/secagg_core.py`` reports that cost).

value / anchor: throughput in GB/s of update bytes (50 x 40 MB per round; the median
over ``--rounds`` rounds), ratio = path / numpy. Memory: the process's peak resident
memory growth during the round (VmHWM after resetting it, minus the resident memory
before the first update arrived), in models (40 MB), for every path; the issue's
target is for medfed's (plain and secure). It includes the one reply in flight.

Run: ``python benchmarks/aggregation.py [--quick] [--size N] [--updates N] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PATHS = ("numpy", "medfed", "flower", "secure")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> int:
    """Reset the process's peak RSS (Linux clear_refs 5); return the RSS now, in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_kb("VmRSS")


def _arrivals(size: int, updates: int, seed: int) -> Any:
    """Each update's (weight, npy bytes), made one at a time into a reused buffer.

    The buffer is allocated here, before the memory baseline is taken (it is the
    sites' memory, not the server's); each update's bytes are the server's.
    """
    from medfed.core.packing import npy_bytes

    rng = np.random.default_rng(seed)
    buf = np.empty(size, dtype=np.float32)
    buf.fill(0.0)  # resident now
    weights = rng.integers(20, 400, size=updates)

    def made() -> Any:
        for w in weights:
            rng.standard_normal(size, dtype=np.float32, out=buf)
            yield int(w), npy_bytes(buf)

    return made()


def _one_round(path: str, size: int, updates: int, seed: int) -> tuple[float, float]:
    """(seconds spent aggregating, peak RSS growth in bytes) of one round on ``path``."""
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.common.constant import SType
    from flwr.serverapp.strategy import FedAvg
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from medfed.core import wire
    from medfed.core.packing import WEIGHTS_KEY, npy_view

    def reply(weight: int, data: bytes) -> Message:
        array = Array(dtype="float32", shape=(size,), stype=SType.NUMPY, data=data)
        return Message(
            RecordDict(
                {
                    wire.ARRAYS_KEY: ArrayRecord({WEIGHTS_KEY: array}),
                    wire.METRICS_KEY: MetricRecord({wire.WEIGHT_KEY: weight, "loss": 0.5}),
                    wire.SITE_RECORD_KEY: ConfigRecord({"name": "site"}),
                }
            ),
            dst_node_id=0,
            message_type=MessageType.TRAIN,
        )

    spent = 0.0
    arrivals = _arrivals(size, updates, seed)
    if path == "flower":  # its API takes the whole round at once
        base = _reset_peak()
        contents = [reply(w, d).content for w, d in arrivals]
        t = time.perf_counter()
        out = aggregate_arrayrecords(contents, wire.WEIGHT_KEY)
        spent = time.perf_counter() - t
        del contents
    else:
        if path == "secure":  # the sites' signed replies are made first, outside the baseline
            arrive, fold, finish, base = _secure(size, updates, seed)
        elif path == "numpy":
            acc: list[np.ndarray] = []

            def fold_numpy(w: int, data: bytes) -> None:
                if not acc:
                    acc.append(np.zeros(size, dtype=np.float32))
                np.add(acc[0], npy_view(data), out=acc[0])

            fold: Callable[[int, bytes], None] = fold_numpy

            def finish() -> Any:
                return np.divide(acc[0], np.float32(updates), out=acc[0])

            base = _reset_peak()
        else:
            from medfed.server.streaming_mean import StreamingMean

            stream = StreamingMean(FedAvg(), size=size, folder=_scratch_folder())

            def fold(w: int, data: Any) -> None:
                stream.fold(1, data)

            def finish() -> Any:
                return stream.aggregate_train(1, [])[0]

            base = _reset_peak()
        for w, data in arrivals:
            if path == "medfed":  # the reply as the grid hands it over (not timed)
                data = reply(w, data)
            elif path == "secure":  # this site's masked reply instead of the float update
                data = arrive()
            t = time.perf_counter()
            fold(w, data)
            spent += time.perf_counter() - t
            del data  # the reply is gone once folded (before the next one arrives)
        t = time.perf_counter()
        out = finish()
        spent += time.perf_counter() - t
    peak = _rss_kb("VmHWM") - base
    assert out is not None
    return spent, peak * 1024.0


def _scratch_folder() -> Any:
    import tempfile

    from medfed.core.config import RunConfig
    from medfed.core.runs import RunFolder

    return RunFolder.create(
        Path(tempfile.mkdtemp(prefix="medfed-bench-")), 1, RunConfig(task="tiny-seg", rounds=1)
    )


def _secure(
    size: int, updates: int, seed: int
) -> tuple[Callable[[], Any], Callable[[int, Any], None], Callable[[], Any], int]:
    """The server's secure path over ``updates`` sites' signed 32-bit vectors.

    ``arrive()`` hands over the next site's (header, vector bytes) as a fresh copy,
    outside the timer, as the other paths get each update freshly written (so every
    path starts from the same cache state).
    """
    from medfed.core.packing import npy_bytes, npy_view
    from medfed.core.secagg import (
        Aggregator,
        MaskedUpdate,
        Roster,
        SecAggConfig,
        SiteIdentity,
        SiteSession,
    )
    from medfed.core.secagg.messages import vector_digest

    cfg = SecAggConfig(mode="default")
    ids = [f"site-{i:02d}" for i in range(updates)]
    idents = {s: SiteIdentity.generate() for s in ids}
    directory = {s: i.public_bytes for s, i in idents.items()}
    sessions = {s: SiteSession(s, idents[s], cfg, "bench", directory=directory) for s in ids}
    roster = Roster.of("bench", [sessions[s].advertise() for s in ids])
    aggregator = Aggregator(cfg, "bench", roster, directory=directory, size=size - 1)
    aggregator.begin_round(1)
    bits = aggregator.fp.modulus_bits
    parts = tuple(sorted(ids))
    rng = np.random.default_rng(seed + 1)
    signed: list[tuple[bytes, bytes]] = []  # each site's header and vector, made up front
    for site in ids:  # the sites' part: outside the timer and the memory baseline
        words = rng.integers(0, 2**bits, size=size, dtype=np.uint32 if bits == 32 else np.uint64)
        words[-1] = 1  # the weight coordinate: its masks would cancel; keep the sum positive
        unsigned = MaskedUpdate(
            "bench", 1, site, bits, parts, size, words, digest=vector_digest(words)
        )
        update = MaskedUpdate(
            "bench",
            1,
            site,
            bits,
            parts,
            size,
            words,
            digest=unsigned.digest,
            signature=idents[site].sign(unsigned.signed_payload()),
        )
        signed.append((update.header(), npy_bytes(words)))
        del words
    queue = iter(signed)

    def arrive() -> tuple[bytes, bytes]:
        header, masked = next(queue)
        return header, memoryview(masked).tobytes()

    def fold(weight: int, data: tuple[bytes, bytes]) -> None:
        header, masked = data
        aggregator.add(MaskedUpdate.from_parts(header, npy_view(masked)))

    def finish() -> Any:
        aggregator.close_collection(1, deadline_passed=True)
        return aggregator.result(1)

    # the prepared replies are the SuperLink's (they arrive one by one), not the server's
    return arrive, fold, finish, _reset_peak()


def _child(args: argparse.Namespace) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    # Flower stamps each message with the run of the ServerApp process it is made in
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    rounds = [_one_round(args.child, args.size, args.updates, seed) for seed in range(args.rounds)]
    print(json.dumps({"seconds": [r[0] for r in rounds], "peak": [r[1] for r in rounds]}))


def main() -> None:
    """Run every path in a process of its own; print the figures and BENCH lines."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=10_000_000, help="parameters per update")
    ap.add_argument("--updates", type=int, default=50, help="updates per round (sites)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per median")
    ap.add_argument("--quick", action="store_true", help="1M parameters, 10 updates")
    ap.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.size, args.updates = 1_000_000, 10
    if args.child:
        _child(args)
        return
    model = 4 * args.size
    per_round = model * args.updates
    print(
        f"aggregation of {args.updates} updates x {args.size:,} float32 parameters "
        f"({per_round / 1e9:.2f} GB per round), median of {args.rounds} rounds"
    )
    figures: dict[str, dict[str, float]] = {}
    # Large buffers come from mmap and go back to the system when freed, so that the
    # resident memory measured is what is alive (glibc would otherwise keep freed
    # buffers of a few MB on its heap after the first one); the same for every path.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    for path in PATHS:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                path,
                "--size",
                str(args.size),
                "--updates",
                str(args.updates),
                "--rounds",
                str(args.rounds),
            ],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        got = json.loads(out.stdout.strip().splitlines()[-1])
        seconds = statistics.median(got["seconds"])
        figures[path] = {
            "gbps": per_round / seconds / 1e9,
            "seconds": seconds,
            "peak_models": max(got["peak"]) / model,
        }
        print(
            f"  {path:7s} {seconds * 1e3:8.1f} ms/round  {figures[path]['gbps']:6.2f} GB/s  "
            f"peak RSS growth {figures[path]['peak_models']:5.2f} models"
        )
    anchor = figures["numpy"]["gbps"]
    for path in ("medfed", "secure"):
        f = figures[path]
        name = "plain" if path == "medfed" else "secure"
        print(
            f"BENCH aggregation {name}_throughput value={f['gbps']:.3f} anchor={anchor:.3f} "
            f"ratio={f['gbps'] / anchor:.3f} target>=0.8 unit=GB/s"
        )
    flower = figures["flower"]
    print(
        f"BENCH aggregation flower_throughput value={flower['gbps']:.3f} anchor={anchor:.3f} "
        f"ratio={flower['gbps'] / anchor:.3f} target>=0 unit=GB/s"
    )
    for path in ("medfed", "secure"):
        name = "plain" if path == "medfed" else "secure"
        f = figures[path]
        print(
            f"BENCH aggregation {name}_peak_rss value={f['peak_models'] * model / 1e6:.1f} "
            f"anchor={model / 1e6:.1f} ratio={f['peak_models']:.3f} target<=3 unit=MB"
        )


if __name__ == "__main__":
    main()

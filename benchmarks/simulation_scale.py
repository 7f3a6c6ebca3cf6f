"""Simulation at scale: 1,000 sites x a 1M-parameter model, medfed vs Flower's Simulation Engine.

Issue 21 (P5). Both engines run FedAvg over the same number of simulated sites,
sampling the same fraction of them for training and for evaluation each round
(default: 1,000 sites, 10%: 100 train + 100 evaluate messages per round), on a
model of 1,000,000 float32 parameters (4 MB), on this machine's CPUs:

- value: ``medfed``'s simulation engine (:func:`medfed.local.simulation.simulate`,
  what `medfed simulate` runs, with its defaults): the deployment's ServerApp code in
  the calling process and the real site worker at every site, the sites in worker
  processes (the default beyond 8 sites: one per core, here 2, with 1 torch thread
  each, as Ray's 2 actors of 1 CPU; until 2026-12-03 one after another in the calling
  process, ratio 1.043), secure aggregation
  off (Flower's engine has none), ``--strategy-option fraction_train=0.1
  fraction_evaluate=0.1``, ``--min-sites 2``. Task ``tiny-seg-1m``: tiny-seg's
  1,947-parameter UNet padded to 1M parameters (random values, each with its own
  update: ``PaddedUNet``), so every message carries a real-size model while each
  local step stays cheap. Each site generates its own data (tiny-seg's synthetic blobs, seed
  ``1000 + i``): 4 images of 32x32, 3 to train on, 1 to evaluate; one local epoch at
  batch size 1 = 3 steps of medfed's trainer (torch's fused Adam, as at every medfed
  site; ``medfed.tasks.optimizers``) per training message. Sites'
  workers are built for each message and dropped after (the engine's default beyond
  8 sites: nothing is held for sites outside a round).
- anchor: Flower 1.42's Simulation Engine (Ray 2.55, ``flwr[simulation]``), in process
  via ``flwr.simulation.run_simulation``: a ServerApp running Flower's ``FedAvg`` with
  the same fractions (``min_train_nodes = min_evaluate_nodes = 2``) and the ClientApp
  of ``benchmarks/stock_flower_app`` (its ``train`` / ``evaluate``, the run config it
  reads given by a mod): the linear model padded the same way to 1M parameters
  (``extra-params``), built for each message: 3 full-batch SGD steps on its node's 256
  generated samples, an MSE evaluation. Local work of the same kind and size: a few
  milliseconds a step for either model on one core. Ray gets this machine's 2 cores
  (``num_cpus=2``) and 1 CPU per ClientApp (2 actors, in parallel), Flower's defaults
  otherwise: the same tuning effort as medfed's engine (none).

Figures (each engine in a subprocess of its own, so that its peak memory is its own):

- seconds per round: wall time from the round's training messages to the end of its
  evaluation and aggregation (medfed: the run's ``round_seconds``; Flower: between
  successive calls of FedAvg's ``evaluate_fn``, which Flower makes before round 1 and
  after each round); the median over ``--rounds`` rounds (5 by default; the issue's
  3 with ``--rounds 3``). Round 1 carries each engine's warm-up (Flower: its actors
  start and import the ClientApp; medfed: first site folders) and is also printed
  on its own. The engines' start-up before round 1 (Ray's start, imports) is not in
  any round and is printed apart.
- peak RSS: of the process that aggregates. medfed's server process (the site
  processes are sampled every 0.25 s and reported apart, as Ray's): its peak resident
  memory (VmHWM) minus its resident memory after start-up, in MB and in model sizes
  (4 MB); target (the issue's): growth <= 3 models,
  the fixed overhead being that start-up RSS (printed; about 0.55 GB: torch, MONAI,
  Flower, medfed, matplotlib, which the run's plots use, and one training step of
  tiny-seg's 1,947-parameter UNet, which loads what torch's optimizers import lazily).
  The growth is measured over the rounds: it is read when the run's end-of-run
  report begins (a wrapper around ``server.app.plot_metrics``, the report's first
  step, reads VmHWM); it includes the run's own start-up (initial model, strategy),
  the global model, the server's running sum and the one reply being added (since
  2026-12-05 a finished reply waits in its site's process until the server takes
  it, and arrives as the bytes the Flower ``Array`` keeps: before, up to workers + 1
  replies plus a copy each, 9.4 models at 200 sites). The end-of-run report (metrics
  read back, the plot, report.md/.html), which does not depend on the model size,
  is printed apart, as a second fixed overhead; the whole run's peak is printed too.
  The BENCH ``peak_rss`` value is the growth that depends on the model: the same
  run (sites, rounds, sampling, seeds) is made a second time with tiny-seg's
  1,947-parameter model, and its growth over the rounds (run bookkeeping for N
  sites: the site processes' set-up, metrics and events, Python's and glibc's
  heaps; about 2 MB at 1,000 sites) is the third stated overhead, subtracted.
  Both growths are printed.
  Flower's driver (ServerApp + Simulation Engine, after ``ray.init``) is measured the
  same way; its Ray processes (ClientApp actors, raylet, GCS, ...) are sampled every
  0.25 s and reported apart (their peak VmHWM). Both engines run with
  ``MALLOC_MMAP_THRESHOLD_=1048576`` (as ``benchmarks/aggregation.py``): freed
  model-size buffers go back to the system, so that the resident memory is what is
  alive, not what glibc keeps on its heap.

``BENCH ... secure_round_seconds_100_sites``: medfed with secure aggregation (default
mode) over 100 sites, against medfed plain over the same 100 sites. Every site is
sampled in every round (fraction 1.0), for both: the heaviest secure round (every
site masks against 99 peers). Sampled secure rounds need ``--secagg-threshold``
below the sample (the default threshold is set from the whole roster). The run's
key set-up (before round 1: every site advertises its per-run key) is printed apart.

Ray stays on the loopback interface: ``ray.init(_node_ip_address="127.0.0.1",
include_dashboard=False)`` with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (without it Ray
swaps 127.0.0.1 for the host's routable address and its gRPC servers listen on all
interfaces), usage statistics and Flower's telemetry off. The Flower child checks the
listening sockets of its process tree (``ss -ltnup``) after ``ray.init`` and during
round 1, and stops if any is not on loopback.

The machine is shared: figures move with other load; medians of several rounds damp it.

Run: ``python benchmarks/simulation_scale.py [--quick] [--rounds N] [--sites N]``
(``--quick``: 100 sites, 2 rounds, secure aggregation over 10 sites). Needs Ray:
``pip install -c constraints.txt -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
STOCK_APP = HERE / "stock_flower_app"
INSTALL = "pip install -c constraints.txt -e '.[bench]'  (Ray via flwr[simulation]==1.42.*)"

#: The model: 1,000,000 float32 parameters (medfed's task; the stock model padded to it).
PARAMS = 1_000_000
TASK = "tiny-seg-1m"
#: The same run with tiny-seg's 1,947 parameters: what the server's memory grows by
#: whatever the model size (run bookkeeping for N sites), stated as fixed overhead.
BOOKKEEPING_TASK = "tiny-seg"
STOCK_PARAMS = 2_000  # the stock linear model: 1,999 weights + 1 bias
MODEL_BYTES = 4 * PARAMS
#: Each medfed site's local work: 4 images (3 train, 1 evaluate), batch 1: 3 steps.
NUM_SAMPLES, BATCH_SIZE, LOCAL_EPOCHS = 4, 1, 1
#: The stock ClientApp's: 3 full-batch SGD steps on its 256 samples.
STOCK_CONFIG = {"lr": 0.02, "local-steps": 3, "extra-params": PARAMS - STOCK_PARAMS}
#: Ray on the loopback interface, quiet, no usage statistics.
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DISABLE_USAGE_STATS": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
#: Every engine's process. Buffers of 1 MiB and more come from mmap and go back to the
#: system when freed, so that the resident memory measured is what is alive (glibc would
#: otherwise keep freed model-size buffers on its heap); as benchmarks/aggregation.py.
CHILD_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "PYTHONUNBUFFERED": "1",
    "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
}


# ------------------------------------------------------------------ memory and processes


def _status_kb(field: str, pid: int | str = "self") -> int:
    """A ``/proc/<pid>/status`` memory field in KiB (0 if the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> int:
    """Reset this process's peak RSS (Linux clear_refs 5); return its RSS now, in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def _descendants(root: int) -> list[int]:
    """The processes below ``root`` (children, their children, ...)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        kids = [p for p, pp in parent.items() if pp == pid]
        found += kids
        todo += kids
    return found


def _process_name(pid: int) -> str:
    """The program a process runs (a Python script's name; Ray's title for its workers)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    words = [w for a in args for w in a.split()]
    if not words:
        return "?"
    name = Path(words[0]).name
    if name.startswith("python"):
        name = next((Path(w).name for w in words[1:] if w.endswith(".py")), name)
    return name


class TreeSampler:
    """Peak RSS (VmHWM) of every process below this one, sampled every ``every`` s."""

    def __init__(self, every: float = 0.25) -> None:
        self.peaks: dict[int, tuple[str, int]] = {}
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for pid in _descendants(os.getpid()):
                hwm = _status_kb("VmHWM", pid)
                name, best = self.peaks.get(pid, ("?", 0))
                if "ClientAppActor" not in name:  # Ray renames a worker once it is an actor
                    now = _process_name(pid)
                    name = name if now == "?" else now
                self.peaks[pid] = (name, max(best, hwm))
            self._stop.wait(self._every)


def _listening(pids: set[int]) -> list[str]:
    """'address:port (process)' of each TCP/UDP socket that ``pids`` listen on."""
    out = subprocess.run(["ss", "-ltnupH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            local = line.split()[4]
            names = ",".join(sorted(set(re.findall(r'\("([^"]+)"', line))))
            found.append(f"{local} ({names})")
    return found


def _loopback(entry: str) -> bool:
    host = entry.split(" ")[0].rsplit(":", 1)[0].strip("[]")
    if host.startswith("::ffff:"):
        host = host[len("::ffff:") :]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # '*', '0.0.0.0' is an address; '*' is not: all interfaces
        return False


def _check_loopback(where: str) -> list[str]:
    """The listening sockets of this process tree; raises if any is not on loopback."""
    pids = {os.getpid(), *_descendants(os.getpid())}
    found = _listening(pids)
    wide = [e for e in found if not _loopback(e)]
    if wide:
        raise RuntimeError(f"Ray listens beyond loopback ({where}): {wide}")
    return found


# ------------------------------------------------------------------ the two engines


def _child_medfed(
    sites: int, rounds: int, fraction: float, secure: str, task: str = TASK
) -> dict[str, Any]:
    """Run medfed's engine (as `medfed simulate`); return its round seconds and peak RSS."""
    import logging

    import matplotlib.pyplot  # noqa: F401  (the run's plots: start-up, not growth)

    from medfed.core.config import DataSourceConfig, RunConfig, validate
    from medfed.local.sim_sites import SimSite
    from medfed.local.simulation import simulate

    logging.getLogger("flwr").setLevel(logging.WARNING)
    _warm_up_code()
    run = RunConfig.model_validate(
        {
            "task": task,
            "rounds": rounds,
            "min_sites": 2,
            "seed": 0,
            "strategy": "fedavg",
            "strategy_options": {"fraction_train": fraction, "fraction_evaluate": fraction},
            "local_epochs": LOCAL_EPOCHS,
            "batch_size": BATCH_SIZE,
            "secure_aggregation": secure,
            "round_timeout_s": 86_400.0,
        }
    )
    chosen = [
        SimSite(
            f"site-{i + 1}",
            validate(
                DataSourceConfig,
                {"kind": "synthetic", "seed": 1000 + i, "profile": i, "num_samples": NUM_SAMPLES},
                where="benchmark site",
            ),
        )
        for i in range(sites)
    ]
    import medfed.server.app as server_app

    # The rounds' peak: read when the run's end-of-run report begins (its plot comes first).
    rounds_peak: list[int] = []
    plot_metrics = server_app.plot_metrics

    def plot_after_rounds(*args: Any, **kwargs: Any) -> Any:
        rounds_peak.append(_status_kb("VmHWM"))
        return plot_metrics(*args, **kwargs)

    server_app.plot_metrics = plot_after_rounds
    runs = Path(tempfile.mkdtemp(prefix="medfed-simscale-"))
    try:
        with TreeSampler() as tree:
            base = _reset_peak()
            t0 = time.perf_counter()
            folder, summary = simulate(run, chosen, runs)
            total = time.perf_counter() - t0
            peak = _status_kb("VmHWM")
        if summary.status != "completed":
            raise RuntimeError(f"medfed simulation {summary.status}: {summary.reason}")
        events = folder.read_events()
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    stamp = {e["event"]: e["time"] for e in events}
    setup = None
    if "secure-aggregation-ready" in stamp:
        from datetime import datetime

        setup = (
            datetime.fromisoformat(stamp["secure-aggregation-ready"])
            - datetime.fromisoformat(stamp["run-started"])
        ).total_seconds()
    seconds = [
        float(v) for _, v in sorted(summary.round_seconds.items(), key=lambda kv: int(kv[0]))
    ]
    return {
        "round_seconds": seconds,
        "base_kb": base,
        "peak_kb": peak,
        "rounds_peak_kb": rounds_peak[0] if rounds_peak else peak,
        "total_seconds": total,
        "setup_seconds": setup,
        "workers": summary.simulation.workers if summary.simulation else 0,
        "site_process_peak_kb": [kb for _, kb in tree.peaks.values()],
    }


def _warm_up_code() -> None:
    """Load what a site's first step loads lazily (torch's optimizer machinery), at no model size.

    One Adam step of tiny-seg's 1,947-parameter UNet: start-up, not growth with the model.
    """
    import torch

    from medfed.tasks import get_task
    from medfed.tasks.optimizers import adam

    task = get_task("tiny-seg")
    model = task.build_model()
    optimizer = adam(model.parameters(), lr=1e-3)  # the sites' own (fused) Adam
    task.build_loss()(
        model(torch.zeros(1, 1, 32, 32)), torch.zeros(1, 1, 32, 32, dtype=torch.long)
    ).backward()
    optimizer.step()


def _stock_apps(sites: int, rounds: int, fraction: float, marks: list[float]) -> tuple[Any, Any]:
    """Flower's ServerApp (FedAvg, ``fraction``) and the stock ClientApp, with its config."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from stockapp import client_app as stock
    from stockapp.task import make_model

    def stock_config(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
        """The run config the stock ClientApp reads (a deployment's pyproject gives it).

        Handed over in a copy of the context: Flower forbids changing a node's run config.
        """
        return call_next(
            msg,
            Context(
                run_id=context.run_id,
                node_id=context.node_id,
                node_config=context.node_config,
                state=context.state,
                run_config={**context.run_config, **STOCK_CONFIG},
            ),
        )

    client = ClientApp(mods=[stock_config])
    client.train()(stock.train)
    client.evaluate()(stock.evaluate)
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_train=fraction,
            fraction_evaluate=fraction,
            min_train_nodes=2,
            min_evaluate_nodes=2,
            min_available_nodes=sites,
        )

        def on_round_end(server_round: int, arrays: ArrayRecord) -> None:
            marks.append(time.time())  # before round 1, then after each round
            if server_round == 1:
                _check_loopback("during round 1")

        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(make_model(int(STOCK_CONFIG["extra-params"])).state_dict()),
            num_rounds=rounds,
            train_config=ConfigRecord({"lr": STOCK_CONFIG["lr"]}),
            evaluate_fn=on_round_end,
        )

    return server, client


def _child_flower(sites: int, rounds: int, fraction: float) -> dict[str, Any]:
    """Flower's Simulation Engine (Ray): its round seconds and peak RSS (driver and Ray's)."""
    import logging

    import ray
    import torch  # noqa: F401  (start-up, as medfed's)
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)  # as medfed's (per-round INFO lines)
    sys.path.insert(0, str(STOCK_APP))
    marks: list[float] = []
    server, client = _stock_apps(sites, rounds, fraction, marks)
    scratch = Path(tempfile.mkdtemp(prefix="ray-"))
    init_args = {
        "num_cpus": 2,
        "_node_ip_address": "127.0.0.1",
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": False,
        "_temp_dir": str(scratch),
    }
    t0 = time.perf_counter()
    # As Flower's RayBackend starts Ray (workers find the app through PYTHONPATH), done
    # here so that the driver's RSS after start-up can be read before round 1.
    pythonpath = os.pathsep.join(sys.path)
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
    started = time.perf_counter() - t0
    try:
        sockets_at_start = _check_loopback("after ray.init")
        with TreeSampler() as tree:
            base = _reset_peak()
            t0 = time.perf_counter()
            run_simulation(
                server_app=server,
                client_app=client,
                num_supernodes=sites,
                backend_config={
                    "init_args": init_args,
                    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                },
            )
            total = time.perf_counter() - t0
            peak = _status_kb("VmHWM")
    finally:
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    if len(marks) != rounds + 1:
        raise RuntimeError(f"Flower's simulation ran {len(marks) - 1} of {rounds} rounds")
    actors = [kb for name, kb in tree.peaks.values() if "ClientAppActor" in name]
    others: dict[str, int] = {}
    for name, kb in tree.peaks.values():
        if "ClientAppActor" not in name:
            others[name] = max(others.get(name, 0), kb)
    return {
        "round_seconds": [b - a for a, b in zip(marks, marks[1:], strict=False)],
        "base_kb": base,
        "peak_kb": peak,
        "total_seconds": total,
        "ray_start_seconds": started,
        "actor_peak_kb": actors,
        "ray_other_peak_kb": others,
        "listening": sockets_at_start,
    }


def _run_child(
    engine: str,
    sites: int,
    rounds: int,
    fraction: float,
    secure: str = "off",
    task: str = TASK,
) -> dict[str, Any]:
    env = {**os.environ, **CHILD_ENV, **(RAY_ENV if engine == "flower" else {})}
    cmd = [
        sys.executable,
        __file__,
        "--child",
        engine,
        "--sites",
        str(sites),
        "--rounds",
        str(rounds),
        "--fraction",
        str(fraction),
        "--secure",
        secure,
        "--task",
        task,
    ]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(
            f"the {engine} run ({sites} sites, secure aggregation {secure}) "
            f"failed with exit code {out.returncode}"
        )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    got["wall_seconds"] = time.perf_counter() - t0
    return got


# ------------------------------------------------------------------ report


def _mb(kb: float) -> float:
    return kb * 1024 / 1e6


def _describe(label: str, r: dict[str, Any]) -> float:
    """Print one run's rounds; return its median round seconds."""
    seconds = r["round_seconds"]
    median = statistics.median(seconds)
    later = statistics.median(seconds[1:]) if len(seconds) > 1 else median
    print(
        f"  {label}: rounds {' '.join(f'{s:.2f}' for s in seconds)} s; median {median:.2f} s "
        f"(round 1, with warm-up: {seconds[0]:.2f} s; median of rounds 2+: {later:.2f} s); "
        f"child process {r['wall_seconds']:.1f} s in all"
    )
    return median


def main() -> None:
    """Run every engine in a process of its own; print the figures and BENCH lines."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=1000, help="simulated sites")
    ap.add_argument(
        "--fraction",
        type=float,
        default=0.1,
        help="fraction of the sites sampled per round (train and evaluate)",
    )
    ap.add_argument("--rounds", type=int, default=5, help="rounds per median")
    ap.add_argument(
        "--secure-sites",
        type=int,
        default=100,
        help="sites of the secure-aggregation figure (all sampled every round)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="100 sites, 2 rounds; secure aggregation over 10 sites"
    )
    ap.add_argument("--child", choices=("medfed", "flower"), help=argparse.SUPPRESS)
    ap.add_argument("--secure", default="off", help=argparse.SUPPRESS)
    ap.add_argument("--task", default=TASK, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "medfed":
        print(
            json.dumps(
                _child_medfed(args.sites, args.rounds, args.fraction, args.secure, args.task)
            )
        )
        return
    if args.child == "flower":
        print(json.dumps(_child_flower(args.sites, args.rounds, args.fraction)))
        return
    if importlib.util.find_spec("ray") is None:
        print(
            f"error: the anchor, Flower's Simulation Engine, needs Ray, which is not "
            f"installed.\n  fix: {INSTALL}",
            file=sys.stderr,
        )
        sys.exit(2)
    if shutil.which("ss") is None:
        print(
            "error: `ss` (iproute2) is needed to check that Ray listens on loopback only",
            file=sys.stderr,
        )
        sys.exit(2)
    if args.quick:
        args.sites, args.rounds, args.secure_sites = 100, 2, 10
    per_round = max(2, int(args.sites * args.fraction))
    print(
        f"simulation_scale: FedAvg, {args.sites} sites, {per_round} sampled per round "
        f"(train and evaluate), {args.rounds} rounds, {PARAMS:,}-parameter model "
        f"({MODEL_BYTES / 1e6:.0f} MB)"
    )

    flower = _run_child("flower", args.sites, args.rounds, args.fraction)
    medfed = _run_child("medfed", args.sites, args.rounds, args.fraction)
    books = _run_child("medfed", args.sites, args.rounds, args.fraction, task=BOOKKEEPING_TASK)
    f_med = _describe("Flower Simulation Engine (Ray)", flower)
    m_med = _describe(f"medfed simulate ({medfed['workers']} site processes)", medfed)
    print(
        f"  Ray start-up (not in any round): {flower['ray_start_seconds']:.1f} s; Ray listens "
        f"on: {', '.join(flower['listening'])} (loopback only: checked after start and in "
        f"round 1)"
    )

    m_raw = (medfed["rounds_peak_kb"] - medfed["base_kb"]) * 1024
    m_books = (books["rounds_peak_kb"] - books["base_kb"]) * 1024
    m_growth = m_raw - m_books
    m_end = (medfed["peak_kb"] - medfed["rounds_peak_kb"]) * 1024
    f_growth = (flower["peak_kb"] - flower["base_kb"]) * 1024
    print(
        f"  medfed process: fixed overhead (RSS after start-up) {_mb(medfed['base_kb']):.0f} MB; "
        f"peak over the rounds {_mb(medfed['rounds_peak_kb']):.0f} MB; growth "
        f"{m_raw / 1e6:.1f} MB = {m_raw / MODEL_BYTES:.2f} models, of which "
        f"{m_books / 1e6:.1f} MB is run bookkeeping (the same run with the "
        f"{BOOKKEEPING_TASK} model grows by that much) and {m_growth / 1e6:.1f} MB = "
        f"{m_growth / MODEL_BYTES:.2f} models grow with the model (the server: global "
        f"model, running sum, the reply being added); the end-of-run report (metrics read "
        f"back, plot, report.md/html) adds {m_end / 1e6:.1f} MB more to the peak "
        f"({_mb(medfed['peak_kb']):.0f} MB), whatever the model size"
    )
    print(
        f"  medfed site processes' peak RSS (MB): "
        f"{' '.join(f'{_mb(kb):.0f}' for kb in medfed['site_process_peak_kb'])}"
    )
    print(
        f"  Flower driver:  fixed overhead (RSS after ray.init) {_mb(flower['base_kb']):.0f} MB; "
        f"peak {_mb(flower['peak_kb']):.0f} MB; growth {f_growth / 1e6:.1f} MB = "
        f"{f_growth / MODEL_BYTES:.2f} models"
    )
    actors = flower["actor_peak_kb"]
    others = ", ".join(
        f"{n} {_mb(kb):.0f}" for n, kb in sorted(flower["ray_other_peak_kb"].items())
    )
    print(
        f"  Ray processes' peak RSS (MB): {len(actors)} ClientApp actors "
        f"{' '.join(f'{_mb(kb):.0f}' for kb in actors)}; {others}"
    )

    secure = _run_child("medfed", args.secure_sites, args.rounds, 1.0, secure="default")
    plain = _run_child("medfed", args.secure_sites, args.rounds, 1.0)
    print(
        f"secure aggregation: {args.secure_sites} sites, all sampled every round "
        f"(fraction 1.0: see the docstring)"
    )
    s_med = _describe("medfed secure (default mode)", secure)
    p_med = _describe("medfed plain                ", plain)
    print(f"  key set-up before round 1: {secure['setup_seconds']:.2f} s")

    print(
        f"BENCH simulation_scale round_seconds_{args.sites}_sites value={m_med:.3f} "
        f"anchor={f_med:.3f} ratio={m_med / f_med:.3f} target<=1.0 unit=s"
    )
    print(
        f"fixed overhead of the peak_rss figure: {_mb(medfed['base_kb']):.0f} MB (medfed's RSS "
        f"after start-up), {m_books / 1e6:.1f} MB of run bookkeeping for {args.sites} sites "
        f"(measured with the {BOOKKEEPING_TASK} model) and {m_end / 1e6:.1f} MB for the "
        f"end-of-run report; the value is the growth above these over the rounds"
    )
    print(
        f"BENCH simulation_scale peak_rss value={m_growth / 1e6:.1f} "
        f"anchor={MODEL_BYTES / 1e6:.1f} ratio={m_growth / MODEL_BYTES:.3f} target<=3 unit=MB"
    )
    print(
        f"BENCH simulation_scale secure_round_seconds_{args.secure_sites}_sites "
        f"value={s_med:.3f} anchor={p_med:.3f} ratio={s_med / p_med:.3f} target>=0 unit=s"
    )


if __name__ == "__main__":
    main()

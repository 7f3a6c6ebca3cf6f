"""Round latency: medfed vs a stock Flower 1.42 deployment, same tiny workload, one run.

Both federations run on 127.0.0.1 with TLS and SuperNode authentication: one
SuperLink, 3 SuperNodes, 5 rounds of FedAvg (train + evaluate per round) on a
model of about 2,000 parameters, or with ``--params 10M`` / ``--params 50M`` on
both models padded to that size with parameters whose mean offsets the output
(stock: the linear model; medfed: ``tiny-seg-10m`` / ``tiny-seg-50m``): every
message then carries a real-size model while each local step stays as cheap as
before, so the figure is the platform's cost of moving and adding real-size models. Local
steps: the stock app's 5 full-batch SGD steps (torch's SGD, one pass over the
parameters per step); medfed's tiny-seg recipe, one epoch of Adam at batch 16 (torch's
fused Adam, one pass per step, as at every medfed site since 2026-12-07).

- anchor: a plain Flower app (``benchmarks/stock_flower_app``: default ServerApp
  and ClientApp, stock ``flower-superlink`` / ``flower-supernode``, launched with
  ``flwr run``), 2,000-parameter linear model. Flower starts a fresh ClientApp
  process per message and polls every 3 s.
- value: ``medfed`` (``LocalFederation``: real site daemons with warm workers),
  task ``tiny-seg`` (a 1,947-parameter MONAI UNet), with secure aggregation on (its
  default; stock Flower has none, so medfed does more work) unless
  ``--secure-aggregation off`` gives both the same workload.

Figure: median seconds per round (train + evaluate + aggregation), ratio
medfed / stock. Target (issues 2 and 21): ratio <= 0.3, at every model size.

Run: ``python benchmarks/round_latency.py [--quick] [--rounds N] [--params 10M|50M]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medfed.core.config import RunConfig
from medfed.core.identity import CertificateAuthority, SiteKeys, save_server_identity
from medfed.core.procs import Managed, ProcessGroup, free_port, wait_for_port
from medfed.local import LocalFederation

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SITES = 3


def _flwr_env(home: Path) -> dict[str, str]:
    # Stock settings; PATH only so that Flower finds its own helpers (flower-superexec)
    # when this interpreter's environment is not activated.
    return {
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }


def run_stock(
    root: Path, rounds: int, app: Path = HERE / "stock_flower_app", extra_config: str = ""
) -> list[float]:
    """Stock Flower: SuperLink + SuperNodes + `flwr run` of ``app``; returns seconds per round.

    The app's ServerApp writes ``round_seconds`` to ``out-dir/result.json``.
    """
    certs, keys, home = root / "certs", root / "keys", root / "flwr_home"
    ca = CertificateAuthority.create("stock")
    ca.save(certs / "ca.pem", certs / "ca.key")
    key, cert = ca.issue_server_cert(["127.0.0.1", "localhost"])
    save_server_identity(key, cert, certs / "server.pem", certs / "server.key")
    port = free_port()
    env = _flwr_env(home)
    home.mkdir(parents=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "ca.pem"}"\n'
    )
    with ProcessGroup() as group:
        link = group.start(
            Managed(
                "stock SuperLink",
                [
                    str(BIN / "flower-superlink"),
                    "--ssl-ca-certfile",
                    str(certs / "ca.pem"),
                    "--ssl-certfile",
                    str(certs / "server.pem"),
                    "--ssl-keyfile",
                    str(certs / "server.key"),
                    "--enable-supernode-auth",
                    "--database",
                    str(root / "state.db"),
                    "--disable-runtime-dependency-installation",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                root / "superlink.log",
                env=env,
            )
        )
        if not wait_for_port("127.0.0.1", port, timeout=60, alive=link.alive):
            raise RuntimeError(f"stock SuperLink did not start:\n{link.log_tail()}")
        for i in range(SITES):
            node_key = SiteKeys.create()
            node_key.save(keys / f"node{i}", keys / f"node{i}.pub")
            subprocess.run(
                [str(BIN / "flwr"), "supernode", "register", str(keys / f"node{i}.pub"), "bench"],
                env={**os.environ, **env},
                check=True,
                capture_output=True,
                timeout=60,
            )
            group.start(
                Managed(
                    f"stock SuperNode {i}",
                    [
                        str(BIN / "flower-supernode"),
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--root-certificates",
                        str(certs / "ca.pem"),
                        "--auth-supernode-private-key",
                        str(keys / f"node{i}"),
                        "--node-config",
                        f"partition-id={i}",
                        "--port",
                        str(free_port()),
                    ],
                    root / f"node{i}.log",
                    env=env,
                )
            )
        _wait_stock_online(env, SITES)
        out = root / "result"
        subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                str(app),
                "bench",
                "-c",
                f"out-dir='{out}' num-server-rounds={rounds} min-nodes={SITES} "
                f"{extra_config}".strip(),
            ],
            env={**os.environ, **env},
            check=True,
            capture_output=True,
            timeout=120,
        )
        deadline = time.time() + 120 * rounds
        while not (out / "result.json").exists():
            group.check_alive()
            if time.time() > deadline:
                raise RuntimeError("stock Flower run did not finish")
            time.sleep(0.5)
        return list(json.loads((out / "result.json").read_text())["round_seconds"])


def _wait_stock_online(env: dict[str, str], count: int) -> None:
    for _ in range(120):
        res = subprocess.run(
            [str(BIN / "flwr"), "supernode", "ls", "bench", "--format", "json"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        try:
            nodes = json.loads(res.stdout).get("nodes", [])
        except json.JSONDecodeError:
            nodes = []
        if sum(n.get("status") == "online" for n in nodes) >= count:
            return
        time.sleep(0.5)
    raise RuntimeError("stock SuperNodes did not come online")


#: Model sizes (--params) and medfed's task of that size; 0 is tiny-seg's own 1,947.
TASK_OF_SIZE = {0: "tiny-seg", 10_000_000: "tiny-seg-10m", 50_000_000: "tiny-seg-50m"}
STOCK_PARAMS = 2_000  # the stock app's linear model


def parse_params(text: str) -> int:
    """``10M`` -> 10_000_000; one of the sizes in :data:`TASK_OF_SIZE`."""
    value = int(float(text[:-1]) * 1_000_000) if text.upper().endswith("M") else int(text)
    if value not in TASK_OF_SIZE:
        raise argparse.ArgumentTypeError(f"--params {text}: one of 0, 10M, 50M")
    return value


def run_medfed(
    root: Path, rounds: int, task: str = "tiny-seg", secure_aggregation: str = "default"
) -> list[float]:
    """medfed: LocalFederation with real site daemons; returns seconds per round."""
    names = [f"site-{i + 1}" for i in range(SITES)]
    with LocalFederation(root, names, name="bench") as fed:
        fed.create(site_data=lambda i, n: {"num_samples": 64})
        fed.start()
        _, summary = fed.run(
            RunConfig(
                task=task, rounds=rounds, min_sites=SITES, secure_aggregation=secure_aggregation
            )
        )
    if summary.status != "completed":
        raise RuntimeError(f"medfed run failed: {summary}")
    rounds_done = sorted(summary.round_seconds.items(), key=lambda kv: int(kv[0]))
    return [float(v) for _, v in rounds_done]


def main() -> None:
    """Run both, print per-round times, medians and the BENCH line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 5")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--params",
        type=parse_params,
        default=0,
        help="model size: 10M or 50M (default: the 2,000-parameter models)",
    )
    parser.add_argument(
        "--secure-aggregation",
        choices=("default", "strict", "off"),
        default="default",
        help="medfed's (stock Flower has none)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    tmp = Path(tempfile.mkdtemp(prefix="medfed-bench-"))
    try:
        extra = f"extra-params={args.params - STOCK_PARAMS}" if args.params else ""
        stock = run_stock(tmp / "stock", rounds, extra_config=extra)
        medfed = run_medfed(
            tmp / "medfed", rounds, TASK_OF_SIZE[args.params], args.secure_aggregation
        )
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    s_med, m_med = statistics.median(stock), statistics.median(medfed)
    print(f"stock Flower 1.42 seconds per round: {stock}  median {s_med:.2f}")
    print(f"medfed            seconds per round: {medfed}  median {m_med:.2f}")
    measure = "median_round_seconds" + (f"_{args.params // 1_000_000}m" if args.params else "")
    if args.secure_aggregation != "default":
        measure += f"_secagg_{args.secure_aggregation}"
    print(
        f"model size: {args.params or STOCK_PARAMS:,} parameters (both); medfed's secure "
        f"aggregation: {args.secure_aggregation}"
    )
    print(
        f"BENCH round_latency {measure} value={m_med:.3f} anchor={s_med:.3f} "
        f"ratio={m_med / s_med:.3f} target<=0.3 unit=s"
    )


if __name__ == "__main__":
    main()

"""Plain Flower ServerApp with FedAvg; records the wall time of every round."""

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from stockapp.task import make_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg for num-server-rounds; writes round_seconds to out-dir/result.json."""
    rc = context.run_config
    n = int(rc["min-nodes"])
    strategy = FedAvg(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n)
    marks: list[float] = []

    def on_round_end(server_round: int, arrays: ArrayRecord) -> None:
        marks.append(time.time())  # called before round 1 and after each round

    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(make_model(int(rc.get("extra-params", 0))).state_dict()),
        num_rounds=int(rc["num-server-rounds"]),
        train_config=ConfigRecord({"lr": float(rc["lr"])}),
        evaluate_fn=on_round_end,
    )
    rounds = [round(b - a, 3) for a, b in zip(marks, marks[1:], strict=False)]
    out = Path(str(rc["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({"round_seconds": rounds}))

"""Legacy DefaultWorkflow (FedAvg) with or without SecAgg+; records seconds per round."""

import json
import time
from pathlib import Path

from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import ServerApp

from legacyapp.task import get_params, make_model

app = ServerApp()


@app.main()
def main(grid, context) -> None:  # noqa: ANN001
    """Run R rounds; write round_seconds to out-dir/result.json."""
    rc = context.run_config
    n, rounds = int(rc["min-nodes"]), int(rc["num-server-rounds"])
    marks: list[float] = []

    def evaluate_fn(server_round, parameters, config):  # noqa: ANN001, ANN202
        marks.append(time.time())  # before round 1, then after each round's fit
        return None

    strategy = FedAvg(
        min_fit_clients=n,
        min_evaluate_clients=n,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters(get_params(make_model())),
        evaluate_fn=evaluate_fn,
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy
    )
    fit = (
        SecAggPlusWorkflow(num_shares=n, reconstruction_threshold=2)
        if bool(rc["secaggplus"])
        else None
    )
    DefaultWorkflow(fit_workflow=fit)(grid, legacy)
    out = Path(str(rc["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(
        json.dumps(
            {"round_seconds": [round(b - a, 3) for a, b in zip(marks, marks[1:], strict=False)]}
        )
    )

"""Plain Flower ClientApp: trains a few SGD steps, evaluates MSE."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from stockapp.task import make_data, make_model

app = ClientApp()


def _setup(msg: Message, context: Context):
    model = make_model(int(context.run_config.get("extra-params", 0)))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model, make_data(int(context.node_config.get("partition-id", 0)))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local SGD steps."""
    model, (x, y) = _setup(msg, context)
    opt = torch.optim.SGD(model.parameters(), lr=float(context.run_config["lr"]))
    for _ in range(int(context.run_config["local-steps"])):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    return Message(
        RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"train_loss": float(loss.item()), "num-examples": len(x)}),
            }
        ),
        reply_to=msg,
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """MSE of the global model."""
    model, (x, y) = _setup(msg, context)
    with torch.no_grad():
        loss = torch.nn.functional.mse_loss(model(x), y).item()
    return Message(
        RecordDict({"metrics": MetricRecord({"eval_loss": loss, "num-examples": len(x)})}),
        reply_to=msg,
    )

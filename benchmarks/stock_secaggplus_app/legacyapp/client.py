"""Plain Flower NumPyClient; the two ClientApps differ only in the SecAgg+ mod."""

import torch
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from legacyapp.task import get_params, make_data, make_model, set_params


class Client(NumPyClient):
    """A few SGD steps per fit; MSE in evaluate."""

    def __init__(self, partition: int) -> None:
        self.model = make_model()
        self.x, self.y = make_data(partition)

    def fit(self, parameters, config):  # noqa: ANN001, ANN201
        """Five SGD steps from the global parameters."""
        set_params(self.model, parameters)
        opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.mse_loss(self.model(self.x), self.y).backward()
            opt.step()
        return get_params(self.model), len(self.x), {}

    def evaluate(self, parameters, config):  # noqa: ANN001, ANN201
        """MSE of the global parameters on this node's data."""
        set_params(self.model, parameters)
        with torch.no_grad():
            loss = float(torch.nn.functional.mse_loss(self.model(self.x), self.y))
        return loss, len(self.x), {}


def client_fn(context):  # noqa: ANN001, ANN201
    """Build the client of this node."""
    return Client(int(context.node_config.get("partition-id", 0))).to_client()


plain = ClientApp(client_fn=client_fn)
secaggplus = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])

"""An MLP regression model of 0.82 M parameters (brain-tissue-seg-wide's size) and its data."""

import numpy as np
import torch

IN, HIDDEN = 400, 2040


def make_model() -> torch.nn.Module:
    """400 -> 2040 -> 1: 820,081 parameters."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 1)
    )


def make_data(partition_id: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A regression problem, different noise per node."""
    rng = np.random.default_rng(1234 + partition_id)
    w = np.random.default_rng(0).normal(size=(IN, 1)) / np.sqrt(IN)
    x = rng.normal(size=(n, IN)).astype(np.float32)
    y = (x @ w + 0.01 * rng.normal(size=(n, 1))).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)


def get_params(model: torch.nn.Module) -> list[np.ndarray]:
    """Model weights as numpy arrays."""
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def set_params(model: torch.nn.Module, params: list[np.ndarray]) -> None:
    """Load numpy arrays into the model."""
    keys = list(model.state_dict())
    pairs = zip(keys, params, strict=True)
    model.load_state_dict({k: torch.from_numpy(np.asarray(p)) for k, p in pairs})

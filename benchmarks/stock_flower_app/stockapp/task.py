"""A 2,000-parameter linear model and per-node synthetic data."""

import numpy as np
import torch

DIM = 1999


def make_model() -> torch.nn.Module:
    """1,999 weights + 1 bias."""
    torch.manual_seed(0)
    return torch.nn.Linear(DIM, 1)


def make_data(partition_id: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear regression problem, different noise per node."""
    rng = np.random.default_rng(1234 + partition_id)
    w_true = np.random.default_rng(0).normal(size=(DIM, 1)) / np.sqrt(DIM)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    y = (x @ w_true + 0.01 * rng.normal(size=(n, 1))).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)

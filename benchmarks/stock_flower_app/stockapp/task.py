"""A 2,000-parameter linear model and per-node synthetic data."""

import numpy as np
import torch

DIM = 1999


class Padded(torch.nn.Module):
    """The linear model plus ``extra`` parameters: a learned offset, a weighted sum of squares.

    The real-size workload of ``round_latency.py --params`` (medfed's ``tiny-seg-10m``
    and ``tiny-seg-50m`` are padded the same way). The padding starts random and every
    value gets its own gradient: a constant padding or update would let Flower send
    each distinct 5 MB chunk once (objects are stored by content hash).
    """

    def __init__(self, extra: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(DIM, 1)
        self.padding = torch.nn.Parameter(torch.randn(extra) * 1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The linear output, offset by the padding's weighted sum of squares."""
        return self.linear(x) + 5e-3 * self.padding.pow(2).sum()


def make_model(extra: int = 0) -> torch.nn.Module:
    """1,999 weights + 1 bias (+ ``extra`` parameters)."""
    torch.manual_seed(0)
    return Padded(extra) if extra > 0 else torch.nn.Linear(DIM, 1)


def make_data(partition_id: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear regression problem, different noise per node."""
    rng = np.random.default_rng(1234 + partition_id)
    w_true = np.random.default_rng(0).normal(size=(DIM, 1)) / np.sqrt(DIM)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    y = (x @ w_true + 0.01 * rng.normal(size=(n, 1))).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)

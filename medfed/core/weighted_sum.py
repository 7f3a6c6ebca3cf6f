"""A weighted sum of flat float32 updates, folded in one at a time.

The server of a plain-aggregation round adds each site's update into one
accumulator as it arrives and lets it go: memory is O(model), whatever the number
of sites (Flower's ``aggregate_arrayrecords`` holds every reply, O(sites x model)).
A weighted add is one fused ``acc += w * x`` (PyTorch's ``add_`` with ``alpha``,
on one thread: the add is bound by memory, not arithmetic), so the update and the
accumulator cross memory once, as in a plain ``np.add(acc, x, out=acc)``; numpy
would need a multiply and an add.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch


class WeightedSum:
    """``sum(w_i * x_i)`` and ``sum(w_i)`` over the vectors given to :meth:`add`."""

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.total = 0.0
        self.count = 0
        self._acc: np.ndarray | None = None  # allocated by the first add

    def add(self, vector: np.ndarray, weight: float) -> None:
        """Fold ``weight * vector`` in (summed in float32); ``vector`` is only read.

        Raises ValueError for a vector of another length or type, or a weight that is
        not a positive finite number; nothing is added then.
        """
        if vector.dtype.kind != "f" or vector.ndim != 1 or vector.size != self.size:
            raise ValueError(
                f"an update of {vector.size} {vector.dtype} values "
                f"(shape {vector.shape}), expected {self.size} float values"
            )
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(
                f"an update weighted {weight!r}, expected a positive number "
                "(the site's training examples)"
            )
        if self._acc is None:
            self._acc = np.zeros(self.size, dtype=np.float32)
        with warnings.catch_warnings():  # a read-only view (a reply's bytes) is only read
            warnings.simplefilter("ignore", UserWarning)
            update = torch.from_numpy(vector)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # more threads only contend for the same memory bandwidth
        try:
            torch.from_numpy(self._acc).add_(update, alpha=float(weight))
        finally:
            torch.set_num_threads(threads)
        self.total += float(weight)
        self.count += 1

    def take_mean(self) -> np.ndarray:
        """The weighted mean, computed in place: the sum is handed over and emptied."""
        if self._acc is None or self.total <= 0:
            raise ValueError("no update was added: there is no mean")
        mean, self._acc = self._acc, None
        np.divide(mean, np.float32(self.total), out=mean)
        return mean

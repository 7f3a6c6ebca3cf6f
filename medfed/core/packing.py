"""Model weights as ONE flat float32 vector on the wire.

Flower moves every array of an ArrayRecord as its own object, one HTTPS request
(signed by the SuperNode's key) each; a UNet with 40 tensors pays 40 round trips
per message. medfed sends one vector instead. Both ends rebuild the same model
from the task, so the layout (names, shapes, dtypes) is derived, never sent.
Element-wise strategies (FedAvg, FedAdam, FedMedian, Krum, ...) are unaffected by
the flattening, and secure aggregation masks one vector.
"""

from __future__ import annotations

import io
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from medfed.core import bulk_hash

WEIGHTS_KEY = "weights"  # the single array in an ArrayRecord


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of a model's state, in state_dict order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, state: Mapping[str, np.ndarray]) -> Layout:
        """The layout of ``state``."""
        return cls(
            tuple(state),
            tuple(tuple(np.shape(a)) for a in state.values()),
            tuple(np.asarray(a).dtype.str for a in state.values()),
        )

    @property
    def size(self) -> int:
        """Number of scalars in the flat vector."""
        return int(sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes))


def shared_state(state: Mapping[str, np.ndarray], local: Collection[str]) -> dict[str, np.ndarray]:
    """``state`` without the entries a site keeps local (domain adaptation), in order."""
    return {k: v for k, v in state.items() if k not in local}


def pack(state: Mapping[str, np.ndarray]) -> np.ndarray:
    """Concatenate ``state`` (in order) into one float32 vector."""
    if not state:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in state.values()])


def unpack(vector: np.ndarray, layout: Layout, *, copy: bool = True) -> dict[str, np.ndarray]:
    """Split a flat vector back into named arrays with their shapes and dtypes.

    ``copy=False``: views into ``vector`` where the dtype allows (to be read, e.g. saved).
    """
    vector = np.asarray(vector)
    if vector.ndim != 1 or vector.size != layout.size:
        raise ValueError(
            f"weight vector has shape {vector.shape}, the model needs ({layout.size},): "
            "the run's task model differs from this side's"
        )
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape, dtype in zip(layout.names, layout.shapes, layout.dtypes, strict=True):
        n = int(np.prod(shape, dtype=np.int64))
        out[name] = vector[offset : offset + n].reshape(shape).astype(np.dtype(dtype), copy=copy)
        offset += n
    return out


def npy_view(data: bytes) -> np.ndarray:
    """The array of ``.npy`` bytes (a Flower ``Array``'s data), read in place.

    No copy, read-only: ``Array.numpy()`` copies the whole payload, and a server that
    folds one update after another into a sum only needs to read each once.
    """
    head = io.BytesIO(memoryview(data)[:4096])
    version = np.lib.format.read_magic(head)
    shape, fortran, dtype = (
        np.lib.format.read_array_header_1_0(head)
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0(head)
    )
    if dtype.hasobject or (fortran and len(shape) > 1):
        raise ValueError(
            f"an array of {dtype} (fortran order {fortran}), expected a plain numeric vector"
        )
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(data, dtype=dtype, count=count, offset=head.tell()).reshape(shape)


def npy_header(vector: np.ndarray) -> bytes:
    """The ``.npy`` header of a C-contiguous ``vector`` (what precedes its bytes in a file)."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(vector))
    return head.getvalue()


def npy_bytes(vector: np.ndarray) -> bytes:
    """``vector`` as ``.npy`` bytes with one copy (``np.save`` to a buffer makes two)."""
    vector = np.ascontiguousarray(vector)
    return b"".join([npy_header(vector), memoryview(vector).cast("B")])


def model_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """BLAKE3 (hex) of named arrays: names, dtypes, shapes and bytes, in name order.

    The server names a model a site already holds by this digest, and the site finds
    it by the digest it computed itself on receipt, so the two sides never trust each
    other's claim about which bytes a digest stands for.
    """
    h = bulk_hash.hasher(sum(np.asarray(a).nbytes for a in arrays.values()))
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()

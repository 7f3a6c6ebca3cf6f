"""Wire records shared by server and site: Flower message keys and the local channel.

The local channel links the per-message ClientApp and the site's warm worker.

The local channel frames a JSON header and raw array bytes (no pickle: the
header is data, arrays are typed buffers), over a Unix socket only the site's
user can open.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medfed.core.packing import npy_header, npy_view

# The Flower message keys are defined with the typed records in the schema (one place).
from medfed.core.schema import (  # noqa: E402,F401  (re-exported for the channel's users)
    ARRAYS_KEY,
    BUDGET_ROUNDS_KEY,
    CONFIG_KEY,
    FITTED_NOISE_KEY,
    METRICS_KEY,
    PROXIMAL_MU_KEY,
    REVOCATIONS_KEY,
    RUN_CONFIG_KEY,
    RUN_ENDED,
    RUN_PROOF_KEY,
    SECAGG_CERTIFICATES,
    SECAGG_DEADLINE,
    SECAGG_DIRECTORY,
    SECAGG_JOIN,
    SECAGG_PARTICIPANTS,
    SECAGG_RECORD_KEY,
    SECAGG_ROSTER,
    SECAGG_UNMASK,
    SERVER_ROUND_KEY,
    SITE_RECORD_KEY,
    WEIGHT_KEY,
)

BYTES_PREFIX = "bytes:"  # local channel: a bytes value travels as a uint8 array

# ---- node config keys given to the SuperNode by `medfed site start`
NODE_WORKER_SOCKET = "medfed-worker"
NODE_SITE_NAME = "medfed-site"

_LEN = struct.Struct(">Q")
MAX_HEADER_BYTES = 16 * 1024 * 1024


class ChannelError(RuntimeError):
    """The local channel broke or carried a malformed frame."""


@dataclass
class Frame:
    """One request or reply on the local channel."""

    header: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    #: For a frame received with ``immutable=True``: each array's ``.npy`` bytes as they
    #: arrived (the array is a read-only view into them), so that a Flower ``Array`` can
    #: take them as its data without a copy.
    npy: dict[str, bytes] = field(default_factory=dict)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    """``n`` bytes into a buffer of their own (arrays are read in place from it)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ChannelError(f"peer closed the channel after {got} of {n} bytes")
        got += k
    return buf


def _recv_bytes(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes as one ``bytes`` object, received in place (no copy on a blocking socket)."""
    if n == 0:
        return b""
    first = sock.recv(n, socket.MSG_WAITALL)
    if len(first) == n:
        return first
    if not first:
        raise ChannelError(f"peer closed the channel after 0 of {n} bytes")
    # A timeout or a signal cut the wait short: the rest, then one copy.
    return b"".join([first, _recv_exact(sock, n - len(first))])


def send_frame(sock: socket.socket, frame: Frame) -> int:
    """Send ``frame``; returns the number of bytes written.

    Each array goes out as ``.npy`` bytes: its header, then its own memory (a model of
    50M values is not copied to be sent), so that the receiver can hand the bytes to a
    Flower ``Array`` as they are.
    """
    manifest = []
    blobs: list[tuple[bytes, memoryview | bytes]] = []
    for name, arr in frame.arrays.items():
        arr = np.ascontiguousarray(arr)
        npy_head = npy_header(arr)
        manifest.append(
            {"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape), "head": len(npy_head)}
        )
        blobs.append((npy_head, memoryview(arr).cast("B") if arr.size else b""))
    header = json.dumps({"header": frame.header, "arrays": manifest}).encode()
    sizes = b"".join(_LEN.pack(len(h) + len(b)) for h, b in blobs)
    head = b"".join([_LEN.pack(len(header)), header, _LEN.pack(len(blobs)), sizes])
    sock.sendall(head)
    for npy_head, blob in blobs:
        sock.sendall(npy_head)
        sock.sendall(blob)
    return len(head) + sum(len(h) + len(b) for h, b in blobs)


def recv_frame(sock: socket.socket, *, immutable: bool = False) -> Frame:
    """Receive one frame; a malformed frame raises :class:`ChannelError`.

    ``immutable``: the arrays are read-only views into ``bytes`` received in place,
    kept in :attr:`Frame.npy` (a reply that is only read: no copy on the way to a
    Flower ``Array``); otherwise each array has a writable buffer of its own.
    """
    (hlen,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if hlen > MAX_HEADER_BYTES:
        raise ChannelError(f"frame header of {hlen} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        meta = json.loads(_recv_exact(sock, hlen))
    except json.JSONDecodeError as exc:
        raise ChannelError(f"frame header is not JSON: {exc}") from exc
    (count,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if count != len(meta["arrays"]):
        raise ChannelError("frame array count does not match its manifest")
    sizes = [_LEN.unpack_from(_recv_exact(sock, _LEN.size))[0] for _ in range(count)]
    arrays: dict[str, np.ndarray] = {}
    npy: dict[str, bytes] = {}
    for spec, size in zip(meta["arrays"], sizes, strict=True):
        dtype = np.dtype(spec["dtype"])
        if dtype.hasobject:
            raise ChannelError("object arrays are not accepted on the channel")
        npy_head = int(spec.get("head", 0))
        expected = npy_head + int(np.prod(spec["shape"], dtype=np.int64)) * dtype.itemsize
        if size != expected:
            raise ChannelError(f"array {spec['name']!r}: {size} bytes, shape needs {expected}")
        payload = _recv_bytes(sock, size) if immutable else _recv_exact(sock, size)
        if npy_head:
            try:
                arr = npy_view(payload)
            except ValueError as exc:
                raise ChannelError(f"array {spec['name']!r}: {exc}") from None
            if arr.dtype != dtype or list(arr.shape) != list(spec["shape"]):
                raise ChannelError(
                    f"array {spec['name']!r}: its .npy header differs from the manifest"
                )
            if immutable:
                npy[spec["name"]] = bytes(payload)  # already bytes: no copy
        else:
            arr = np.frombuffer(payload, dtype=dtype).reshape(spec["shape"])
        arrays[spec["name"]] = arr
    return Frame(header=meta["header"], arrays=arrays, npy=npy)


def call_worker(socket_path: str, frame: Frame, *, timeout: float | None = None) -> Frame:
    """Send one request to the warm worker and wait for its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
        except OSError as exc:
            raise ChannelError(
                f"cannot reach the site worker at {socket_path}: {exc}; "
                "is `medfed site start` running?"
            ) from exc
        send_frame(sock, frame)
        return recv_frame(sock, immutable=True)

"""BLAKE3 digests of large buffers (models, masked updates), on every core.

A 10M-parameter update is 40 MB. SHA-256 reads it at about 1.8 GB/s on one core
(22 ms), which made the digest check most of the server's secure-aggregation work
(50 sites: 1.1 s of a 1.3 s round). BLAKE3 is a tree hash, so its reference
implementation hashes one buffer on all cores: about 9 GB/s on this project's
2-core CI machine. Small messages and audit records keep SHA-256.

A masked update is hashed in fixed 1 MiB segments (:func:`segmented_digest`), so
that the server can check it and add it into the round's sum in one pass, each core
taking a share of the segments while they are still in its cache
(:func:`add_and_digest`): hashing, then adding, a 40 MB update read it from memory
twice, and the add ran on one core.
"""

from __future__ import annotations

import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import blake3
import numpy as np

ALGORITHM = "blake3"
SEGMENTED = "blake3-1mib-segments"  # what a masked update's signed digest is
SEGMENT_BYTES = 1 << 20
_SEGMENTED_DOMAIN = b"medfed segmented blake3 v1"
_THREADED_FROM = 1 << 20  # below about a MiB the thread hand-off costs more than it saves
_MAX_WORKERS = 8

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def hasher(size_hint: int) -> blake3.blake3:
    """A BLAKE3 hasher that uses every core for inputs of ``size_hint`` bytes or more."""
    threads = blake3.blake3.AUTO if size_hint >= _THREADED_FROM else 1
    return blake3.blake3(max_threads=threads)


def array_digest(vector: np.ndarray) -> bytes:
    """The 32-byte BLAKE3 digest of an array's bytes (C order; no copy when contiguous)."""
    data = memoryview(np.ascontiguousarray(vector)).cast("B")
    h = hasher(data.nbytes)
    h.update(data)
    return h.digest()


def segmented_digest(vector: np.ndarray) -> bytes:
    """The :data:`SEGMENTED` digest of a 1-D array's bytes.

    BLAKE3 over a domain label, the byte length, the segment size and the BLAKE3
    digest of each consecutive :data:`SEGMENT_BYTES` of the array (the last one
    shorter): a hash list, collision-resistant when BLAKE3 is.
    """
    return _combine(_flat(vector), None)


def add_and_digest(acc: np.ndarray, vector: np.ndarray) -> bytes:
    """Add ``vector`` into ``acc`` in place (wrapping for unsigned words); return its digest.

    The same value as ``segmented_digest(vector)``, computed in the same pass as the
    add. If this raises, ``acc`` may hold part of the sum; the caller must drop it.
    Undo a completed add whose digest turns out wrong with ``np.subtract``
    (exact modulo 2**k for unsigned words).
    """
    words = _flat(vector)
    if acc.dtype != words.dtype or acc.shape != words.shape or not acc.flags.c_contiguous:
        raise ValueError(
            f"accumulator {acc.dtype}{acc.shape} cannot take a {words.dtype}{words.shape} "
            "vector; they need the same dtype and length (contiguous)"
        )
    return _combine(words, acc)


def _flat(vector: np.ndarray) -> np.ndarray:
    words = np.ascontiguousarray(vector)
    if words.ndim != 1:
        raise ValueError(f"a segmented digest is of a 1-D array, got shape {words.shape}")
    return words


def _combine(words: np.ndarray, acc: np.ndarray | None) -> bytes:
    outer = blake3.blake3(_SEGMENTED_DOMAIN)
    outer.update(struct.pack("<QQ", words.nbytes, SEGMENT_BYTES))
    for digest in _segment_digests(words, acc):
        outer.update(digest)
    return outer.digest()


def _segment_digests(words: np.ndarray, acc: np.ndarray | None) -> list[bytes]:
    """Each segment's digest, in order; ``acc += words`` on the way when ``acc`` is given."""
    per = max(1, SEGMENT_BYTES // max(words.itemsize, 1))
    count = -(-words.size // per)

    def span(first: int, stop: int) -> list[bytes]:
        out = []
        for s in range(first, stop):
            lo, hi = s * per, min((s + 1) * per, words.size)
            piece = words[lo:hi]
            out.append(blake3.blake3(memoryview(piece).cast("B")).digest())
            if acc is not None:  # while the piece is still in this core's cache
                np.add(acc[lo:hi], piece, out=acc[lo:hi])
        return out

    workers = min(_cores(), count)
    if workers <= 1:
        return span(0, count)
    cuts = [count * j // workers for j in range(workers + 1)]
    futures = [_executor().submit(span, cuts[j], cuts[j + 1]) for j in range(1, workers)]
    try:
        first = span(cuts[0], cuts[1])  # the calling thread takes the first share
    finally:
        wait(futures)  # never return (or raise) while a worker still writes into acc
    return first + [d for f in futures for d in f.result()]


def _cores() -> int:
    try:
        return max(1, min(len(os.sched_getaffinity(0)), _MAX_WORKERS))
    except AttributeError:  # not Linux
        return max(1, min(os.cpu_count() or 1, _MAX_WORKERS))


def _forget_pool() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()  # a forked child has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_MAX_WORKERS - 1, thread_name_prefix="medfed-hash")
        return _pool

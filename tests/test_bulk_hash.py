"""Segmented BLAKE3: the digest masked updates are signed by; the server's add-and-check pass."""

from __future__ import annotations

import multiprocessing
import struct

import blake3
import numpy as np
import pytest

from medfed.core import bulk_hash

SEGMENT = 1 << 20


def reference_digest(vector: np.ndarray) -> bytes:
    """The documented definition, written out independently of the threaded code."""
    raw = vector.tobytes()
    listed = b"medfed segmented blake3 v1" + struct.pack("<QQ", len(raw), SEGMENT)
    for start in range(0, len(raw), SEGMENT):
        listed += blake3.blake3(raw[start : start + SEGMENT]).digest()
    return blake3.blake3(listed).digest()


WORDS_PER_SEGMENT = SEGMENT // 4
SIZES = [0, 1, WORDS_PER_SEGMENT, WORDS_PER_SEGMENT + 1, 7 * WORDS_PER_SEGMENT // 2]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("cores", [1, 3])
def test_digest_and_add_match_the_definition_on_any_number_of_cores(
    size: int, dtype: type, cores: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk_hash, "_cores", lambda: cores)
    rng = np.random.default_rng(size + cores)
    top = np.iinfo(dtype).max
    vector = rng.integers(0, top, size=size, dtype=dtype, endpoint=True)
    acc = rng.integers(0, top, size=size, dtype=dtype, endpoint=True)
    want_sum = acc + vector  # numpy wraps unsigned words: the sum mod 2**k
    assert bulk_hash.segmented_digest(vector) == reference_digest(vector)
    assert bulk_hash.add_and_digest(acc, vector) == reference_digest(vector)
    np.testing.assert_array_equal(acc, want_sum)


def test_a_changed_word_in_any_segment_changes_the_digest() -> None:
    vector = np.random.default_rng(1).integers(
        0, 2**32, size=3 * WORDS_PER_SEGMENT, dtype=np.uint32
    )
    base = bulk_hash.segmented_digest(vector)
    for index in (0, WORDS_PER_SEGMENT, vector.size - 1):
        changed = vector.copy()
        changed[index] ^= 1
        assert bulk_hash.segmented_digest(changed) != base
    # the length is hashed too: a vector and its zero-padded copy differ
    assert bulk_hash.segmented_digest(np.append(vector, np.uint32(0))) != base


def test_an_accumulator_of_another_shape_or_dtype_is_refused_untouched() -> None:
    vector = np.arange(10, dtype=np.uint32)
    for acc in (np.zeros(9, dtype=np.uint32), np.zeros(10, dtype=np.uint64)):
        with pytest.raises(ValueError, match="same dtype and length"):
            bulk_hash.add_and_digest(acc, vector)
        assert not acc.any()


def _digest_in_child(queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    vector = np.arange(3 * WORDS_PER_SEGMENT, dtype=np.uint32)
    queue.put(bulk_hash.segmented_digest(vector))


def test_a_forked_child_hashes_on_threads_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child forked after the parent's pool ran must not wait on the parent's threads."""
    monkeypatch.setattr(bulk_hash, "_cores", lambda: 2)
    vector = np.arange(3 * WORDS_PER_SEGMENT, dtype=np.uint32)
    want = bulk_hash.segmented_digest(vector)  # the pool now has an idle thread
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_digest_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung on its parent's hashing threads")
    assert child.exitcode == 0 and queue.get(timeout=5) == want

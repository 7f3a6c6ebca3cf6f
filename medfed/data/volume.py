"""Decode a planned series into a channel-first float32 volume ``(c, x, y, z)``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from medfed.data.assemble import SeriesPlan
from medfed.data.decode import FileProblem, decode_file, describe_error
from medfed.data.records import SkipReason

Decoder = Callable[[Path], np.ndarray]


def decode_volume(plan: SeriesPlan, root: Path, *, decoder: Decoder | None = None) -> np.ndarray:
    """Decode every file of ``plan`` once and stack its frames in ``z`` order.

    Parameters
    ----------
    plan : SeriesPlan
        From :func:`medfed.data.assemble.assemble`.
    root : Path
        The site folder the plan's paths are relative to.
    decoder : callable, optional
        ``path -> (frames, rows, columns, samples)`` array; defaults to
        :func:`medfed.data.decode.decode_file`.

    Returns
    -------
    numpy.ndarray
        float32, shape ``plan.shape``, RescaleSlope/RescaleIntercept applied per
        frame.

    Raises
    ------
    medfed.data.decode.FileProblem
        A file of the series does not decode; its ``path`` names the file.
    """
    decode = decoder or decode_file
    volume = np.empty(plan.shape, dtype=np.float32)
    decoded: dict[str, np.ndarray] = {}
    for z, ref in enumerate(plan.frames):
        try:
            if ref.path not in decoded:
                decoded[ref.path] = decode(root / ref.path)
            frame = decoded[ref.path][ref.index].astype(np.float64)
            if ref.slope != 1.0 or ref.intercept != 0.0:
                frame = frame * ref.slope + ref.intercept
            volume[..., z] = frame.transpose(2, 1, 0)  # (rows, cols, c) -> (c, x, y)
        except FileProblem as problem:
            problem.path = ref.path
            raise
        except (IndexError, ValueError) as exc:  # fewer frames or other sizes than the header
            raise FileProblem(
                SkipReason.DECODE_FAILED,
                f"its decoded pixels do not fit the header ({describe_error(exc)})",
                path=ref.path,
            ) from exc
        except Exception as exc:  # a decoder plugin's own error type
            raise FileProblem(SkipReason.UNEXPECTED, describe_error(exc), path=ref.path) from exc
    return volume

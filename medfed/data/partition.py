"""Share one dataset's items out among N simulated sites: IID, or non-IID by a Dirichlet draw.

Pure functions on the items' keys (a label, a scanner): the same keys, number of
sites, scheme, ``alpha`` and seed give the same split, item for item.

``iid``: the items shuffled and dealt into N near-equal parts; keys are ignored.

``dirichlet``: for each key, the proportions in which its items go to the N sites
are drawn from Dirichlet(alpha, ..., alpha) (the label-skew partition of Li, Diao,
Chen & He, "Federated Learning on Non-IID Data Silos: An Experimental Study",
ICDE 2022, after Hsu, Qi & Brown 2019, arXiv:1909.06335). A small ``alpha`` gives
each site items of few keys; a large one approaches IID. A draw that leaves a site
with fewer than ``min_items`` items is drawn again (at most :data:`MAX_DRAWS`
times), then the largest sites give items to the short ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np

from medfed.core.errors import ConfigError

#: The partition schemes.
SCHEMES = ("iid", "dirichlet")
#: Dirichlet draws tried before short sites are topped up from the largest.
MAX_DRAWS = 100
_STREAM = 0x9A27  # mixed into the seed: this stream is independent of the run's others


def partition(
    keys: Sequence[Hashable],
    sites: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_items: int = 1,
) -> list[list[int]]:
    """The indices of ``keys`` each of ``sites`` sites holds, each list sorted.

    Parameters
    ----------
    keys : sequence
        One key per item (its label or its scanner); only ``dirichlet`` reads them.
    sites : int
        How many parts.
    scheme : str
        ``"iid"`` or ``"dirichlet"``.
    alpha : float
        Dirichlet concentration (> 0); smaller is more skewed.
    seed : int
        Seed of the split.
    min_items : int
        Fewest items a site may get (a site needs a training and a validation item).

    Raises
    ------
    ConfigError
        An unknown scheme, ``alpha <= 0``, or too few items for ``sites * min_items``.
    """
    n = len(keys)
    if scheme not in SCHEMES:
        raise ConfigError(
            f"Unknown partition scheme {scheme!r}.",
            where="--partition",
            expected=" or ".join(SCHEMES),
        )
    if sites < 1 or n < sites * min_items:
        raise ConfigError(
            f"{n} items cannot be shared among {sites} sites with at least {min_items} each.",
            where="--sites",
            expected=f"at most {n // max(min_items, 1)} sites for {n} items",
            fix="use fewer sites, or more data (e.g. `medfed data synth --subjects`)",
        )
    if scheme == "dirichlet" and not alpha > 0:
        raise ConfigError(
            f"Dirichlet alpha must be positive, got {alpha}.",
            where="--alpha",
            expected="e.g. 0.1 (skewed) to 100 (close to IID)",
        )
    rng = np.random.default_rng([seed, _STREAM])
    if scheme == "iid":
        return [sorted(part.tolist()) for part in np.array_split(rng.permutation(n), sites)]
    by_key: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    groups = [by_key[k] for k in sorted(by_key, key=repr)]  # a stable order of keys
    parts: list[list[int]] = []
    for _ in range(MAX_DRAWS):
        parts = [[] for _ in range(sites)]
        for items in groups:
            shuffled = rng.permutation(items)
            cuts = (np.cumsum(rng.dirichlet([alpha] * sites))[:-1] * len(items)).astype(int)
            for part, chunk in zip(parts, np.split(shuffled, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(map(len, parts)) >= min_items:
            break
    else:
        _top_up(parts, min_items, rng)
    return [sorted(p) for p in parts]


def _top_up(parts: list[list[int]], min_items: int, rng: np.random.Generator) -> None:
    """Move items from the largest parts to those short of ``min_items`` (in place)."""
    for part in parts:
        while len(part) < min_items:
            donor = max(parts, key=len)
            part.append(donor.pop(int(rng.integers(len(donor)))))


def mix(keys: Sequence[Hashable], parts: Sequence[Sequence[int]]) -> list[dict[Hashable, int]]:
    """How many items of each key every part holds."""
    return [dict(Counter(keys[i] for i in part)) for part in parts]

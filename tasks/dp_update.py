"""Update-level DP: a site clips its whole update and adds Gaussian noise before it leaves.

Its epsilon is :func:`medfed.core.privacy_accounting.epsilon_for_update_dp`.
"""

from __future__ import annotations

import numpy as np
import torch

from medfed.core.errors import MedfedError


def clip_and_noise_update(
    delta_vector: np.ndarray,
    *,
    clipping_norm: float,
    noise_multiplier: float,
    generator: np.random.Generator | None = None,
) -> np.ndarray:
    """L2-clip a site's update to ``clipping_norm`` and add Gaussian noise (a new array).

    The noise is ``N(0, (noise_multiplier * clipping_norm)^2)`` per coordinate.
    This is the client-side part of Flower's ``DifferentialPrivacyClientSideFixedClipping``
    (McMahan et al. 2018, "Learning differentially private recurrent language
    models"), with the noise added at the site instead of the server, so it still
    holds once updates are encrypted: with secure aggregation the server only ever
    sees the noised, masked sum. A site passes no ``generator``: the noise then comes
    from :class:`~medfed.tasks.dp_noise.SecureRandom`; a seeded one is for tests.
    Fails closed on a non-finite update.
    """
    from medfed.tasks.dp_noise import SecureRandom

    if clipping_norm <= 0 or noise_multiplier < 0:
        raise ValueError(
            f"need clipping_norm > 0 and noise_multiplier >= 0, got {clipping_norm}, "
            f"{noise_multiplier}"
        )
    vec = np.asarray(delta_vector, dtype=np.float64)
    if not np.all(np.isfinite(vec)):
        raise MedfedError(
            "The update holds NaN or infinite values; it is not sent.",
            fix="check the local training (learning rate, data); the round is refused",
        )
    norm = float(np.linalg.norm(vec))
    clipped = vec * min(1.0, clipping_norm / norm) if norm > 0 else vec.copy()
    std = noise_multiplier * clipping_norm
    noise = (
        generator.normal(0.0, std, size=vec.shape)
        if generator is not None
        else SecureRandom().normal(std, torch.empty(vec.shape, dtype=torch.float64)).numpy()
    )
    noised = clipped + noise
    out_dtype = delta_vector.dtype if np.issubdtype(delta_vector.dtype, np.floating) else np.float64
    return noised.astype(out_dtype)

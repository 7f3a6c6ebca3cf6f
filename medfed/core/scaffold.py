"""SCAFFOLD's control-variate math (Karimireddy et al. 2020, option II), as pure functions.

The server's strategy (``medfed.strategies.scaffold``) and the site worker both call
these; they live in the core because both sides need them.

Units. medfed keeps control variates as *drift per local step*, in parameter units:
``D = lr * c``, where ``c`` is the paper's control variate (a gradient) and ``lr`` the
site's local learning rate. Nobody then needs a learning rate: the server updates ``D``
from models, and a site corrects each of its steps by ``D - D_i`` in parameter space.

One round, with ``x`` the global model sent, ``K`` the strategy's fixed number of local
steps (the same at every site), ``y_i`` site ``i``'s model after them:

- after every optimizer step the site moves its parameters by ``-(D - D_i)``. With plain
  SGD that is the paper's corrected gradient ``g - c_i + c`` (``lr (c - c_i) = D - D_i``);
  with Adam (medfed's default) or momentum the optimizer would rescale or accumulate a
  correction added to the gradient (Adam divides it by the gradient's own scale, so a
  site's data would drown in it), so it is applied to the step instead. Under DP-SGD it
  comes after clipping and noise: a constant, data-independent offset;
- the site then sets ``D_i+ = D_i - D + (x - y_i) / K`` (option II) and keeps it;
- the server, from the aggregated model ``y_bar = sum_S p_i y_i`` alone (``p_i`` the
  aggregation weights, the sites' example counts normalised over the round's sites
  ``S``), sets ``D+ = D + |S|/N * ((x - y_bar) / K - D)``.

Why the last line is the paper's ``c+ = c + 1/N sum_S (c_i+ - c_i)`` with the model's
weights: ``sum_S p_i (D_i+ - D_i) = sum_S p_i ((x - y_i)/K - D) = (x - y_bar)/K - D``,
because ``sum_S p_i = 1``. With equal weights it is exactly the paper's update; with
example-count weights ``D`` is the weighted control variate of the weighted objective
``sum_i p_i f_i`` that FedAvg optimises (exact under full participation, where the
weights do not change between rounds). ``N`` counts the run's sites, ``|S|`` those sampled
this round. So nothing beyond the model update leaves a site: the server needs only the
weighted mean, which secure aggregation gives it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def server_control_update(
    control: np.ndarray,
    sent: np.ndarray,
    aggregated: np.ndarray,
    *,
    local_steps: int,
    sampled: int,
    total: int,
) -> np.ndarray:
    """The server's new ``D``: ``D + sampled/total * ((sent - aggregated) / K - D)``."""
    if local_steps <= 0 or sampled <= 0 or total < sampled:
        raise ValueError(
            f"local_steps={local_steps}, sampled={sampled}, total={total}: expected "
            "local_steps > 0 and 0 < sampled <= total"
        )
    mean_change = (sent.astype(np.float64) - aggregated) / local_steps - control
    return (control + (sampled / total) * mean_change).astype(np.float32)


def site_control_update(
    own: Mapping[str, np.ndarray],
    control: Mapping[str, np.ndarray],
    sent: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    *,
    local_steps: int,
) -> dict[str, np.ndarray]:
    """A site's new ``D_i = D_i - D + (x - y_i) / K`` (option II), per tensor of ``control``."""
    if local_steps <= 0:
        raise ValueError(f"local_steps={local_steps}: expected > 0")
    return {
        k: (
            own[k].astype(np.float64)
            - control[k]
            + (sent[k].astype(np.float64) - trained[k]) / local_steps
        ).astype(np.float32)
        for k in control
    }


def step_correction(
    own: Mapping[str, np.ndarray], control: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """What a site subtracts from its parameters after each step: ``D - D_i = lr (c - c_i)``."""
    return {k: (control[k].astype(np.float64) - own[k]).astype(np.float32) for k in control}

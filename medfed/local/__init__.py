"""A whole federation on one machine: on 127.0.0.1 (`medfed demo`, tests), or simulated.

:mod:`medfed.local.simulation` runs the ServerApp over simulated sites in one process
(`medfed simulate`); :mod:`medfed.local.sim_sites` says what data they hold.

It may import both ``medfed.server`` and ``medfed.client`` (it plays both roles);
neither of them imports it.
"""

from medfed.local.federation import LocalFederation

__all__ = ["LocalFederation"]

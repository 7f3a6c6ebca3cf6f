"""A whole federation on one machine (127.0.0.1): used by `medfed demo`, the tests and benchmarks.

It may import both ``medfed.server`` and ``medfed.client`` (it plays both roles);
neither of them imports it.
"""

from medfed.local.federation import LocalFederation

__all__ = ["LocalFederation"]

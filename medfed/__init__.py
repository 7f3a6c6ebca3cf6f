"""medfed: federated learning for medical imaging across hospital sites.

The import package holds a small shared core (`medfed.core`), the role packages
(`medfed.server`, `medfed.client`, `medfed.strategies`, `medfed.tasks`) and the
command line (`medfed.cli`), which sits on top and is imported by nothing.
"""

__version__ = "0.1.0"

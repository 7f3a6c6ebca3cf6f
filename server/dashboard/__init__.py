"""The coordinator's read-only web dashboard (`medfed server dashboard`).

``state`` reads the federation (sites, SuperLink node status, run folders), ``page``
renders it, ``http`` routes requests; :mod:`medfed.core.web` serves them.
"""

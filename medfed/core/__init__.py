"""Shared core: config schemas, identity, registries, wire records, run folders.

Imports none of `server`, `client`, `strategies`, `tasks`.
"""

"""Command line: the face on top; holds no logic a test would call without a terminal."""

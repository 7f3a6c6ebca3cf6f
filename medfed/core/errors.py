"""User-facing errors: what was wrong, where, what was expected, how to fix it."""

from __future__ import annotations


class MedfedError(Exception):
    """An error the user can fix; the CLI prints it without a traceback.

    Parameters
    ----------
    what : str
        What was wrong, in one sentence.
    where : str, optional
        The file, key, site or address concerned.
    expected : str, optional
        What was expected instead.
    fix : str, optional
        The command or change that fixes it.
    """

    def __init__(self, what: str, *, where: str = "", expected: str = "", fix: str = "") -> None:
        self.what = what
        self.where = where
        self.expected = expected
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        """Return the message as the CLI prints it."""
        lines = [self.what]
        if self.where:
            lines.append(f"  where:    {self.where}")
        if self.expected:
            lines.append(f"  expected: {self.expected}")
        if self.fix:
            lines.append(f"  fix:      {self.fix}")
        return "\n".join(lines)


class ConfigError(MedfedError):
    """A configuration file or run option is missing, malformed or out of range."""


class UnknownNameError(MedfedError):
    """A task, strategy or hook name is not registered."""


class IdentityError(MedfedError):
    """A certificate or key is missing, invalid, expired or not trusted."""


class ProcessError(MedfedError):
    """A process medfed started failed to come up or died."""

"""User-facing errors.

Anything a user can fix (a bad path, an unknown key, a module trained on another base)
raises :class:`XlpeftError`; the CLI prints it as one ``Error:`` line without a traceback.
Everything else is a bug and keeps its traceback under ``--debug``.
"""

from __future__ import annotations


class XlpeftError(Exception):
    """An error the user can fix; the message says what was expected, what was received, how to fix it."""


class ConfigError(XlpeftError):
    """A configuration value or key is invalid; the message lists every problem found."""

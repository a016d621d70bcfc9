"""The one exception type for user errors.

A user error is a bad path, a bad config value, a bad data row: something the user fixes, not a bug.
The CLI prints it as one line (``error: ...``) and exits with code 2; bugs keep their traceback.
"""

from __future__ import annotations


class LmstackError(Exception):
    """A problem with the user's input. The message names the thing and, where possible, the fix."""


class ConfigError(LmstackError):
    """A config field that is unknown, missing, or of the wrong type or value."""


class DataError(LmstackError):
    """An input file or data row that cannot be used (missing, empty, not UTF-8, wrong fields)."""

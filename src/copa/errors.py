"""Errors that are the user's to fix: a config value, a path, a data file, a saved model.

The CLI reports any ``UserError`` as one line and exits with status 2, without a traceback (``-v``
adds it); everything else is a bug and keeps its traceback. Each class also derives from the
builtin exception it used to be, so code that catches ``ValueError`` or ``FileNotFoundError`` keeps
working.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user asked for cannot be done as asked; the message says what and where."""


class DataSourceError(UserError, ValueError):
    """A data source that cannot be read at all (missing, not JSON, wrong layout, no records)."""


class DataFileNotFoundError(DataSourceError, FileNotFoundError):
    """A data file or shard pattern that names nothing on disk."""


class CheckpointError(UserError, ValueError):
    """A saved model directory that is incomplete or damaged (config or weights unreadable)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A path that is not a saved COPA model at all."""

"""The project's error types.

Anything a user can fix (a bad config key, a corrupt file, a missing checkpoint) raises a
:class:`WorkbenchError` with one human sentence. The CLI turns it into one line on stderr and exit
code 2; the app turns it into a ``gr.Error``. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """A problem with the user's input, config or files: print the message, exit 2."""


class ConfigError(WorkbenchError):
    """An unknown key, a wrong type or an impossible value in a config or override."""


class MediaError(WorkbenchError):
    """A medium (image, audio, video, text) that cannot be decoded or breaks a configured limit."""


class CheckpointError(WorkbenchError):
    """A checkpoint that is missing, incomplete, or does not match the code."""


class NotYetAvailable(WorkbenchError):
    """A subcommand whose issue has not landed yet."""

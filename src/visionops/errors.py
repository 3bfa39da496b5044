"""Errors the CLI reports as one clear line (no traceback): bad input, not bugs.

Anything else (a plain ValueError included) is a bug and keeps its traceback. The subclasses also
inherit the builtin they replace, so callers that catch it keep working.
"""


class VisionopsError(Exception):
    """Base of the errors a user can fix: bad params, bad data, a failed download or gate."""


class InvalidInputError(VisionopsError, ValueError):
    """A file, folder, setting or argument the user gave cannot be used as it is."""


class MissingInputError(VisionopsError, FileNotFoundError):
    """A file or folder the command needs is absent (often: an earlier stage has not run)."""


class ValidationFailed(VisionopsError):
    """A critical data check failed; `summary` is what was written to `summary.json`."""

    def __init__(self, message: str, summary: dict) -> None:
        super().__init__(message)
        self.message = message
        self.summary = summary

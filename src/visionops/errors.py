"""Errors the CLI reports as one clear line (no traceback): bad input, not bugs."""


class VisionopsError(Exception):
    """Base of the errors a user can fix: bad params, bad data, a failed download or gate."""


USER_ERRORS = (VisionopsError, FileNotFoundError, NotADirectoryError, ValueError)

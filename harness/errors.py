"""Errors a user can cause. The CLI prints them as one line and exits non-zero, with no traceback."""


class UserError(Exception):
    """A mistake the user can fix: the message says what to do."""

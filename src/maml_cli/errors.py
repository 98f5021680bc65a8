"""Errors a user can fix, reported as one paragraph without a traceback."""


class UserError(Exception):
    """Something about the command, the config or the files on disk is wrong.

    The message says what was wrong and how to fix it; the command-line entry
    points print it and exit with status 2 instead of showing a traceback.
    """


class DataError(UserError):
    """A dataset is missing, incomplete or corrupt."""


class EpisodeError(UserError, ValueError):
    """A way/shot/query that a split cannot supply."""

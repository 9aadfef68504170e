"""The package's one error type (chatkit.cli.run_main turns it into one `error: ...` line)."""


class ChatkitError(Exception):
    """A user-facing problem: the message says what went wrong, where, and how to fix it."""

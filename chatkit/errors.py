"""The package's one error type (chatkit.cli.run_main turns it into one `error: ...` line), and SIGTERM's."""


class ChatkitError(Exception):
    """A user-facing problem: the message says what went wrong, where, and how to fix it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (chatkit.cli turns the signal into this): it unwinds like Ctrl-C, so half-written files are
    removed and training saves, but nothing that catches Ctrl-C to carry on (the chat's "stop this
    answer") may carry on after it."""

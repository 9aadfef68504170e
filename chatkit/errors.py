"""The package's one error type, and the wrapper that turns it into `error: ...` for the scripts."""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional, Sequence


class ChatkitError(Exception):
    """A user-facing problem: the message says what went wrong, where, and how to fix it."""


def run_main(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run a script's main: a ChatkitError becomes one `error:` line on stderr and exit code 1.

    Set CHATKIT_DEBUG=1 to get the full traceback instead. Other exceptions are bugs and keep theirs.
    """
    try:
        return main(argv)
    except ChatkitError as exc:
        if os.environ.get("CHATKIT_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

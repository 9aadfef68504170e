#!/usr/bin/env python3
"""demo_chatbot: not implemented yet (see the project's open issues)."""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    print("demo_chatbot.py: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

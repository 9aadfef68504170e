#!/usr/bin/env python3
"""convert_chatgpt_export: not implemented yet (see the project's open issues)."""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    print("convert_chatgpt_export.py: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Convert ChatGPT's "Export data" archive into chat training data.

Examples:
    python convert_chatgpt_export.py chatgpt-export.zip conversations.jsonl --preview
    python convert_chatgpt_export.py export-folder/ data.json --min-exchanges 2 --max-chars 8000
    python convert_chatgpt_export.py old.zip new.zip merged.jsonl --redact --since 2024-01-01
    python convert_chatgpt_export.py export.zip data.jsonl --all-branches --metadata --chatgpt-model gpt-4o

INPUT is the zip as downloaded, an extracted folder, a conversations.json, or a split
conversations-NNN.json set; several INPUTs merge (a conversation seen twice keeps its newest copy).
OUTPUT ending in .jsonl (or --jsonl) gets one record per line, otherwise a JSON array. Each record
is {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from chatkit.cli import make_parser as build_parser, parse, run_main
from chatkit.options import ConvertOptions


def make_parser():
    return build_parser(ConvertOptions, __doc__)


def convert(argv: Optional[Sequence[str]] = None) -> int:
    options = parse(ConvertOptions, __doc__, argv)
    from chatkit import conversion

    stats = conversion.run(options)
    print(conversion.format_stats(stats, options), file=sys.stderr)
    print(f"wrote {stats.records} records to {options.output}", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(convert, argv)


if __name__ == "__main__":
    sys.exit(main())

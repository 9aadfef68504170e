#!/usr/bin/env python3
"""Convert ChatGPT's "Export data" archive into chat training data.

Examples:
    python convert_chatgpt_export.py chatgpt-export.zip conversations.jsonl --preview
    python convert_chatgpt_export.py export-folder/ data.json --min-exchanges 2 --max-length 8000
    python convert_chatgpt_export.py old.zip new.zip merged.jsonl --redact --since 2024-01-01
    python convert_chatgpt_export.py export.zip data.jsonl --all-branches --metadata --model gpt-4o

INPUT is the zip as downloaded, an extracted folder, a conversations.json, or a split
conversations-NNN.json set; several INPUTs merge (a conversation seen twice keeps its newest copy).
OUTPUT ending in .jsonl (or --jsonl) gets one record per line, otherwise a JSON array. Each record
is {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from chatkit.errors import ChatkitError, run_main


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="INPUT ... OUTPUT", help="one or more exports, then the output file")
    out = parser.add_argument_group("output")
    out.add_argument("--jsonl", action="store_true", help="write JSON Lines whatever OUTPUT is called")
    out.add_argument("--metadata", action="store_true", help="add id, title, create_time and model to each record")
    out.add_argument("--preview", nargs="?", type=int, const=3, default=0, metavar="K",
                     help="print K converted conversations to stderr (default 3)")
    out.add_argument("--quiet", action="store_true", help="no progress lines")
    content = parser.add_argument_group("what a conversation becomes")
    content.add_argument("--all-branches", action="store_true",
                         help="every root-to-leaf path (edits, regenerations) becomes its own record")
    content.add_argument("--include-tools", action="store_true",
                         help="keep tool calls and results as fenced blocks inside the assistant turn")
    content.add_argument("--image-placeholder", metavar="TEXT", help="put TEXT where an image or file was")
    content.add_argument("--system-prompt", metavar="TEXT", help="prepend this system message to every record")
    content.add_argument("--custom-instructions", action="store_true",
                         help="use the conversation's custom instructions as its system message")
    content.add_argument("--redact", action="store_true",
                         help="replace e-mails, phone numbers, keys and tokens, IPs and card numbers with [EMAIL] etc.")
    limits = parser.add_argument_group("filters and limits")
    limits.add_argument("--min-exchanges", type=int, default=1, metavar="N",
                        help="keep conversations with at least N user->assistant exchanges (default 1)")
    limits.add_argument("--max-length", type=int, metavar="N", help="drop conversations over N characters")
    limits.add_argument("--max-tokens", type=int, metavar="N", help="drop conversations over N tokens (needs --tokenizer)")
    limits.add_argument("--tokenizer", metavar="MODEL", help="model whose tokenizer counts --max-tokens")
    limits.add_argument("--truncate", action="store_true",
                        help="with --max-length/--max-tokens: cut at an exchange boundary instead of dropping")
    limits.add_argument("--since", metavar="DATE", help="only conversations created on or after DATE (YYYY-MM-DD)")
    limits.add_argument("--until", metavar="DATE", help="only conversations created on or before DATE")
    limits.add_argument("--title", metavar="REGEX", help="only conversations whose title matches (case-insensitive)")
    limits.add_argument("--model", metavar="SLUG", help="only conversations with this model (e.g. gpt-4o)")
    limits.add_argument("--exclude-archived", action="store_true", help="leave out archived conversations")
    return parser


def options_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace):
    from chatkit.conversion import ConvertOptions, parse_date

    problems = []
    if len(args.paths) < 2:
        problems.append("give at least one INPUT and then the OUTPUT file")
    for flag in ("min_exchanges", "max_length", "max_tokens", "preview"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            problems.append(f"--{flag.replace('_', '-')} must not be negative")
    if args.truncate and not (args.max_length or args.max_tokens):
        problems.append("--truncate needs --max-length or --max-tokens")
    if problems:
        parser.error("; ".join(problems))
    output = args.paths[-1]
    return ConvertOptions(
        inputs=args.paths[:-1], output=output, jsonl=args.jsonl or output.lower().endswith(".jsonl"),
        metadata=args.metadata, min_exchanges=args.min_exchanges, max_length=args.max_length,
        max_tokens=args.max_tokens, tokenizer=args.tokenizer, truncate=args.truncate,
        all_branches=args.all_branches, include_tools=args.include_tools,
        image_placeholder=args.image_placeholder, system_prompt=args.system_prompt,
        custom_instructions=args.custom_instructions, redact=args.redact,
        since=parse_date(args.since) if args.since else None,
        until=parse_date(args.until, end_of_day=True) if args.until else None,
        title=args.title, model=args.model, exclude_archived=args.exclude_archived,
        preview=args.preview, progress=not args.quiet,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(convert, argv)


def convert(argv: Optional[Sequence[str]] = None) -> int:
    from chatkit import conversion

    parser = make_parser()
    args = parser.parse_args(argv)
    options = options_from_args(parser, args)
    if any(path == options.output for path in options.inputs):
        raise ChatkitError(f"{options.output}: OUTPUT is also an INPUT; name a new file for the output")
    stats = conversion.run(options)
    print(conversion.format_stats(stats, options), file=sys.stderr)
    print(f"wrote {stats.records} records to {options.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

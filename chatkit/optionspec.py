"""How an option is declared and checked: `option()` (a dataclass field carrying its flag, help and check)
and `problems()`, which checks a filled-in options object and names each flag."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import List

def option(default=None, help: str = "", *, flags=(), deprecated=(), metavar=None, choices=None, nargs=None,
           const=None, positional=False, required=False, check=None, factory=None):
    """A dataclass field carrying its command-line declaration.

    flags: other accepted spellings; deprecated: old spellings that still work with a note;
    check: "positive", "non-negative", "off-or-more" (0 means off), "fraction" (0 <= x < 1), "probability"
    (0 < x <= 1), or a function returning a problem text (or None).
    """
    metadata = dict(help=help, flags=tuple(flags), deprecated=tuple(deprecated), metavar=metavar, choices=choices,
                    nargs=nargs, const=const, positional=positional, required=required, check=check)
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


CHECKS: dict = {
    "positive": (lambda v: v > 0, "must be positive"),
    "non-negative": (lambda v: v >= 0, "must not be negative"),
    "fraction": (lambda v: 0 <= v < 1, "must be at least 0 and below 1"),
    "probability": (lambda v: 0 < v <= 1, "must be above 0 and at most 1"),
    "off-or-more": (lambda v: v >= 0, "must be 0 (off) or more"),
    "seed": (lambda v: 0 <= v < 2**32, "must be a whole number from 0 to 4294967295"),  # what numpy and torch take
}


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def problems(options) -> List[str]:
    """Every problem with a filled-in options object, each naming its flag, so one run reports them all."""
    found = []
    for item in dataclasses.fields(options):
        check, value = item.metadata.get("check"), getattr(options, item.name)
        choices = item.metadata.get("choices")
        if choices and value is not None and value not in choices:  # a --config value argparse did not see
            found.append(f"{flag_name(item.name)} {value!r} is not one of: {', '.join(map(str, choices))}")
            continue
        if check is None or value is None:
            continue
        if isinstance(check, str):
            test, text = CHECKS[check]
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                found.append(f"{flag_name(item.name)} must be a number, not {value!r}")
            elif not test(value):
                found.append(f"{flag_name(item.name)} {text}")
        else:
            problem = check(value)
            if problem:
                found.append(f"{flag_name(item.name)} {problem}")
    cross = getattr(options, "cross_problems", None)
    return found + (cross() if cross else [])

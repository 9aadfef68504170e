"""Replacing personal data and secrets in text with typed placeholders such as [EMAIL]."""

from __future__ import annotations

import re
from collections import Counter
from typing import List, Tuple

# Order matters: specific secrets before generic numbers, so a key is not half-eaten as a phone number.
# Every repeat is bounded (an address part at most 64 characters, a key block at most 8,000), so each
# pattern runs in time linear in the text: a 200 KB run of dots and letters cannot make it backtrack for minutes.
PATTERNS: List[Tuple[str, re.Pattern]] = [
    ("PRIVATE_KEY", re.compile(r"-----BEGIN [A-Z ]{0,40}PRIVATE KEY-----[\s\S]{0,8000}?"
                               r"-----END [A-Z ]{0,40}PRIVATE KEY-----")),
    ("API_KEY", re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_\-]{16,}")),  # OpenAI / Anthropic style
    ("GITHUB_TOKEN", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,})")),
    ("AWS_KEY", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("HF_TOKEN", re.compile(r"\bhf_[A-Za-z0-9]{30,}")),
    ("SLACK_TOKEN", re.compile(r"\bxox[abprs]-[A-Za-z0-9\-]{10,}")),
    ("BEARER_TOKEN", re.compile(r"(?i)(?<=\bbearer )[A-Za-z0-9\-._~+/]{20,}=*")),
    ("JWT", re.compile(r"\beyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}")),
    ("EMAIL", re.compile(r"\b[A-Za-z0-9._%+\-]{1,64}@[A-Za-z0-9\-]{1,63}(?:\.[A-Za-z0-9\-]{1,63}){0,8}"
                         r"\.[A-Za-z]{2,24}\b")),
    ("IP_ADDRESS", re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")),
    ("CARD_NUMBER", re.compile(r"\b(?:\d[ \-]?){12,18}\d\b")),
    # A phone number is not part of a longer run of digit groups (that is an order or card number).
    ("PHONE", re.compile(r"(?<![\w+])(?<!\d[ \-.])(?:\+\d{1,3}[ \-.]?)?(?:\(\d{2,4}\)[ \-.]?)?"
                         r"\d{2,4}[ \-.]\d{3,4}[ \-.]?\d{3,4}(?!\w)(?![ \-.]\d)")),
]


def _luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for index, char in enumerate(digits):
        value = int(char)
        if index % 2 == parity:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


class Redactor:
    """Replaces matches with `[KIND]` and counts them per kind."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def __call__(self, text: str) -> str:
        for kind, pattern in PATTERNS:
            text = pattern.sub(lambda match, kind=kind: self._replace(kind, match), text)
        return text

    def _replace(self, kind: str, match: re.Match) -> str:
        if kind == "CARD_NUMBER":
            digits = re.sub(r"\D", "", match.group(0))
            if not (13 <= len(digits) <= 19 and _luhn_ok(digits)):
                return match.group(0)
        self.counts[kind] += 1
        return f"[{kind}]"

"""docs/RELIABILITY.md: at least 130 bad-input cases, each naming a test that exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_case_names_an_existing_test():
    text = (ROOT / "docs" / "RELIABILITY.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (?!case |---)(.+?) \| .+? \| `([\w.]+)::(\w+)(\[.*?\])?` \|$", text, re.M)
    assert len(rows) >= 130
    defined = {}
    for _, module, name, _ in rows:
        if module not in defined:
            tree = ast.parse((ROOT / "tests" / module).read_text(encoding="utf-8"))
            defined[module] = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        assert name in defined[module], f"docs/RELIABILITY.md names {module}::{name}, which does not exist"

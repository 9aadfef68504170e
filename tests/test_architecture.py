"""The module map in docs/ARCHITECTURE.md holds: allowed imports, no circle, small modules and functions."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "chatkit"
SCRIPTS = sorted(ROOT.glob("*.py"))
MAX_FUNCTION_LINES = 60
MAX_MODULE_SHARE = 0.12


def package_imports(path: Path) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("chatkit."):
            found.add(node.module.split(".")[1])
    return found - {"__version__"}


def documented_imports() -> dict:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    allowed = {}
    for name, imports in re.findall(r"^- `(\w+)\.py` — .*? Imports: ([\w, ]+)\.$", text, re.M):
        allowed[name] = set() if imports == "nothing" else {word.strip() for word in imports.split(",")}
    return allowed


def test_every_module_is_documented_and_imports_only_what_the_map_allows():
    allowed = documented_imports()
    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(allowed), "docs/ARCHITECTURE.md lists every module of chatkit/, and only those"
    for name in modules:
        extra = package_imports(PACKAGE / f"{name}.py") - allowed[name]
        assert not extra, f"chatkit/{name}.py imports {sorted(extra)}, which docs/ARCHITECTURE.md does not allow"


def test_no_import_circle():
    graph = {path.stem: package_imports(path) for path in PACKAGE.glob("*.py")}
    visiting, done = set(), set()

    def visit(name, trail):
        assert name not in visiting, "import circle: " + " -> ".join(trail + [name])
        if name in done:
            return
        visiting.add(name)
        for neighbour in graph.get(name, ()):
            visit(neighbour, trail + [name])
        visiting.discard(name)
        done.add(name)

    for name in graph:
        visit(name, [])


def test_scripts_import_the_package_never_each_other():
    scripts = {path.stem for path in SCRIPTS}
    for path in SCRIPTS:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for alias in node.names}
        assert not imported & scripts, f"{path.name} imports another script"


def test_no_module_holds_too_much_and_no_function_is_too_long():
    files = sorted(PACKAGE.glob("*.py")) + SCRIPTS
    lines = {path: len(path.read_text(encoding="utf-8").splitlines()) for path in files}
    total = sum(lines.values())
    for path, count in lines.items():
        assert count <= MAX_MODULE_SHARE * total, f"{path.name} holds {count} of {total} lines"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= MAX_FUNCTION_LINES, f"{path.name}: {node.name} is {length} lines"


def test_no_path_hacks():
    for path in list(ROOT.glob("*.py")) + list((ROOT / "bench").glob("*.py")) + list((ROOT / "tests").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert "sys.path.insert" not in text.replace('"sys.path.insert"', ""), f"{path.name} edits sys.path"

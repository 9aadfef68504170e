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
MAX_MODULE_LINES = 500
MAX_RUN_MODULE_LINES = 400  # pipeline.py: the run read top to bottom, its stages elsewhere
MAX_CLASS_LINES = 150


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


def test_modules_and_classes_stay_small_and_the_run_reads_as_stages():
    for path in sorted(PACKAGE.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert len(text.splitlines()) <= MAX_MODULE_LINES, f"chatkit/{path.name} is over {MAX_MODULE_LINES} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= MAX_CLASS_LINES, f"chatkit/{path.name}: class {node.name} is {length} lines"
    assert len((PACKAGE / "pipeline.py").read_text(encoding="utf-8").splitlines()) < MAX_RUN_MODULE_LINES
    run = next(node for node in ast.walk(ast.parse((PACKAGE / "pipeline.py").read_text(encoding="utf-8")))
               if isinstance(node, ast.FunctionDef) and node.name == "_train")
    assert run.end_lineno - run.lineno + 1 <= 45, "the run's own function reads top to bottom in about 40 lines"


def test_only_the_family_table_names_families():
    """A family's chat and training rules are fields of families.FAMILIES, its GGUF special cases its
    architecture's converter class (ggufconvert.py); no other module compares a family's name."""
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "families.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                named = any(isinstance(side, ast.Attribute) and side.attr == "name" and isinstance(side.value, ast.Name)
                            and side.value.id == "family" for side in sides)
                assert not named, f"chatkit/{path.name}:{node.lineno} branches on a family's name"


def test_options_are_never_rebound_after_planning():
    """What the user asked (TrainOptions) is handed on unchanged; what the plan resolved is a RunPlan."""
    for name in ("pipeline.py", "planning.py"):
        for node in ast.walk(ast.parse((PACKAGE / name).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Assign):
                targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
                assert "options" not in targets or not (
                    isinstance(node.value, ast.Call) and getattr(node.value.func, "attr", "") == "replace"), (
                    f"chatkit/{name}:{node.lineno} re-binds the options")

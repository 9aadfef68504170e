"""Docs that cannot rot: every command line parses, every Python example compiles (short ones run)."""

from __future__ import annotations

import ast
import importlib
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ["convert_chatgpt_export", "train_chatgpt_model", "demo_chatbot", "train_chatbot", "gpt_generate", "export_model"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`(python [^`]+)`")


def blocks(language: str):
    for doc in DOCS:
        for lang, body in FENCE.findall(doc.read_text(encoding="utf-8")):
            if lang == language:
                yield doc, body


def command_lines():
    """(doc, script, arguments) for each toolkit script run in a shell block or an inline command."""
    found = []
    sources = [(doc, body) for doc, body in blocks("bash")]
    sources += [(doc, m) for doc in DOCS for m in INLINE.findall(doc.read_text(encoding="utf-8"))]
    for doc, text in sources:
        for line in text.replace("\\\n", " ").splitlines():
            for segment in re.split(r"&&|\|", line):
                words = shlex.split(segment, comments=True)
                for index, word in enumerate(words):
                    name = Path(word).name
                    if name.endswith(".py") and name[:-3] in SCRIPTS:
                        found.append((doc.name, name[:-3], words[index + 1:]))
                        break
    return found


COMMANDS = command_lines()


def test_the_docs_run_every_script():
    assert {script for _, script, _ in COMMANDS} == set(SCRIPTS)


@pytest.mark.parametrize("doc, script, arguments", COMMANDS, ids=[f"{d}:{s}:{' '.join(a)[:60]}" for d, s, a in COMMANDS])
def test_command_line_parses(doc, script, arguments):
    parser = importlib.import_module(script).make_parser()
    try:
        parser.parse_args(arguments)
    except SystemExit as exc:
        pytest.fail(f"{doc}: `{script}.py {' '.join(arguments)}` is rejected by the parser (exit {exc.code})")


def test_readme_commands_are_the_contract():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = [body.strip() for lang, body in FENCE.findall(readme) if lang == "bash"]
    assert len(commands) == 3, "README: exactly three commands (set-up, main job, tests)"
    setup, main_job, tests = commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup.replace("pip install", "python3 -m pip install --quiet") in ci  # CI runs the README's set-up
    assert tests in ci  # and the README's test command
    for script in ("convert_chatgpt_export.py", "train_chatgpt_model.py --data example_chatgpt_data.json",
                   "demo_chatbot.py"):
        assert script in main_job
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), link
    for name in ("README-CHATGPT-TRAINING.md", "QUICK-START-CHATGPT-TRAINING.md", "HUGGINGFACE-TRAINING-GUIDE.md",
                 "TRAINING-GPT2-CHATBOT.md", "PERFORMANCE.md"):
        assert f"docs/{name}" in readme


def test_every_option_of_the_chatgpt_scripts_is_documented():
    guide = (ROOT / "docs" / "README-CHATGPT-TRAINING.md").read_text(encoding="utf-8")
    for script in ("convert_chatgpt_export", "train_chatgpt_model", "demo_chatbot", "export_model"):
        for action in importlib.import_module(script).make_parser()._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert f"`{option}" in guide, f"{script}.py {option} is not in README-CHATGPT-TRAINING.md"


def test_relative_links_resolve():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"


def test_json_examples_are_valid():
    for doc, body in blocks("json"):
        json.loads(body)


def test_accelerate_configs_are_valid():
    from accelerate.commands.config.config_args import ClusterConfig

    configs = sorted((ROOT / "docs" / "accelerate").glob("*.yaml"))
    assert {c.name for c in configs} >= {"ddp.yaml", "fsdp.yaml", "deepspeed-zero3.yaml"}
    for config in configs:
        ClusterConfig.from_yaml_file(str(config))  # raises on unknown keys


PYTHON = list(blocks("python"))


@pytest.mark.parametrize("doc, code", PYTHON, ids=[f"{d.name}:{i}" for i, (d, _) in enumerate(PYTHON)])
def test_python_examples_compile_and_their_toolkit_imports_exist(doc, code):
    tree = ast.parse(code, filename=doc.name)
    compile(tree, doc.name, "exec")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] in ("chatkit", "gpt_generate"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{doc.name}: {node.module} has no {alias.name}"


def _runnable(code: str) -> bool:
    """Short examples that use only the toolkit (no server, no network) run on tiny models."""
    heavy = ("gradio", "fastapi", "huggingface_hub", "uvicorn")
    return ("chatkit" in code or "gpt_generate" in code) and not any(h in code for h in heavy)


RUNNABLE = [(doc, code) for doc, code in PYTHON if _runnable(code)]


def test_some_examples_run():
    assert len(RUNNABLE) >= 3


@pytest.fixture(scope="module")
def trained_paths(tmp_path_factory, tiny_llama, tiny_gpt2):
    """A tiny chat-model directory and a tiny trained_model.pt to stand in for the docs' paths."""
    import train_chatbot
    import train_chatgpt_model

    work = tmp_path_factory.mktemp("docs-models")
    data = work / "d.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello"}]}]))
    assert train_chatgpt_model.main(["--data", str(data), "--model", str(tiny_llama), "--output",
                                     str(work / "chat-model"), "--epochs", "1"]) == 0
    pairs = work / "pairs.json"
    pairs.write_text(json.dumps([{"user": "Hi", "bot": "Hello"}]))
    assert train_chatbot.main(["--model", str(tiny_gpt2), "--conversation_file", str(pairs), "--epochs", "1",
                               "--save_path", str(work / "trained_model.pt")]) == 0
    return {"chat-model": str(work / "chat-model"), "trained_model.pt": str(work / "trained_model.pt"),
            "gpt2-small (124M)": str(tiny_gpt2)}


@pytest.mark.parametrize("doc, code", RUNNABLE, ids=[f"{d.name}:{i}" for i, (d, _) in enumerate(RUNNABLE)])
def test_short_examples_run_on_tiny_models(doc, code, trained_paths, capsys):
    for name, path in trained_paths.items():
        code = code.replace(f'"{name}"', repr(path))
    code = code.replace("max_new_tokens=100", "max_new_tokens=8").replace("max_new_tokens=60", "max_new_tokens=8")
    exec(compile(code, doc.name, "exec"), {"__name__": "__docs__"})
    assert capsys.readouterr().out.strip()  # the example printed something

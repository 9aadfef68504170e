#!/usr/bin/env python3
"""Benchmark: convert a generated ChatGPT export of at least 1 GB; compare with a plain json.load.

    python bench/convert_export.py --size-gb 1.0 [--workdir /tmp/chatkit-bench] [--keep]

Writes a conversations.json shaped like a real export (system root, branches, tool calls, hidden
messages), then runs, each in a fresh process: the converter on it, and `json.load` of the same file.
Reports wall time and peak resident memory (ru_maxrss) of both.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORDS = ("the model data train chat answer question python export token memory fast simple loss layer "
         "attention weight batch epoch learning rate value story coffee river Paris café 😀 données").split()


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def node(key, parent, role, body, **extra):
    message = {
        "id": key + "-m", "author": {"role": role, "name": None, "metadata": {}}, "create_time": 1.7e9,
        "update_time": None, "content": {"content_type": "text", "parts": [body]},
        "status": "finished_successfully", "end_turn": True, "weight": 1.0,
        "metadata": {"model_slug": "gpt-4o", "finish_details": {"type": "stop"}}, "recipient": "all", "channel": None,
    }
    message.update(extra)
    return {"id": key, "message": message, "parent": parent, "children": []}


def conversation(rng: random.Random, number: int) -> dict:
    mapping = {"root": {"id": "root", "message": None, "parent": None, "children": []}}
    parent = "root"

    def add(key, role, body, **extra):
        nonlocal parent
        mapping[key] = node(key, parent, role, body, **extra)
        mapping[parent]["children"].append(key)
        parent = key

    add("sys", "system", "", metadata={"is_visually_hidden_from_conversation": True})
    for turn in range(rng.randint(2, 12)):
        add(f"u{turn}", "user", text(rng, rng.randint(5, 80)))
        if turn == 1:  # a regenerated answer: a sibling branch
            mapping[f"alt{turn}"] = node(f"alt{turn}", parent, "assistant", text(rng, 40))
            mapping[parent]["children"].append(f"alt{turn}")
        if turn == 2:  # a tool round trip
            add(f"c{turn}", "assistant", "print(1)", recipient="python")
            add(f"o{turn}", "tool", "1")
        add(f"a{turn}", "assistant", text(rng, rng.randint(20, 400)))
    return {"title": f"Conversation {number}", "create_time": 1.7e9 + number, "update_time": 1.7e9 + number,
            "mapping": mapping, "current_node": parent, "id": f"conv-{number}", "default_model_slug": "gpt-4o",
            "moderation_results": [], "is_archived": False}


def generate(path: Path, size_bytes: int) -> int:
    rng = random.Random(0)
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        out.write("[")
        while out.tell() < size_bytes:
            out.write(("," if count else "") + json.dumps(conversation(rng, count)))
            count += 1
        out.write("]")
    return count


def measure(command) -> tuple:
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return time.perf_counter() - start, max(after, before) / 1024  # MB (ru_maxrss is KiB on Linux)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the generated export")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="chatkit-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    export = workdir / "conversations.json"
    if not export.exists() or export.stat().st_size < args.size_gb * 1e9:
        started = time.perf_counter()
        count = generate(export, int(args.size_gb * 1e9))
        print(f"generated {count} conversations, {export.stat().st_size / 1e9:.2f} GB "
              f"in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    size_gb = export.stat().st_size / 1e9
    # RUSAGE_CHILDREN's maxrss is the largest child so far: run the smaller one first.
    convert_s, convert_mb = measure([sys.executable, str(ROOT / "convert_chatgpt_export.py"), str(export),
                                     str(workdir / "out.jsonl"), "--quiet"])
    load_s, load_mb = measure([sys.executable, "-c", f"import json; json.load(open({str(export)!r}, 'rb'))"])
    print(f"export: {size_gb:.2f} GB")
    print(f"convert_chatgpt_export.py: {convert_s:.1f} s, peak RSS {convert_mb:.0f} MB")
    print(f"json.load of the same file: {load_s:.1f} s, peak RSS {load_mb:.0f} MB")
    print(f"converted output: {(workdir / 'out.jsonl').stat().st_size / 1e6:.0f} MB")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Preference benchmark: do the answers a user regenerated teach the model what they wanted?

    python bench/preferences.py                     # the starter model, 40 regenerated answers, 20 held out
    python bench/preferences.py --supervised-data example_chatgpt_data.json --dpo-args "" --dpo-args "--dpo-epochs 4"

A made-up user who always regenerated answers that did not end with a question: the starter model's
own short answers to general prompts are the answers left behind, and the same answers followed by a
question ("Would you like an example?") the regenerations the user went on from. They are written as a
ChatGPT export (conversations.json in a zip, one regeneration per conversation), and then, as a user
would:

    convert_chatgpt_export.py export.zip /dev/null --preferences prefs.jsonl
    train_chatgpt_model.py --data export.zip                              # the supervised model
    train_chatgpt_model.py --data export.zip --preferences prefs.jsonl    # the same, then DPO

Both models (and the starter) answer held-out prompts none of the pairs asks (greedy, through the chat
code); the bench reports how many answers end with a question, and DPO's chosen-minus-rejected
log-probability margin on its held-out pairs (chatkit.json). The supervised stage trains on the
conversations as the user went on with them, so the kept answers, questions and all, are learned
before DPO: `--supervised-data example_chatgpt_data.json` trains it on other conversations instead,
to see what the preferences alone do. Results: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from quality import ask  # the bench beside this one: the same chat code, greedy

from chatkit.models import load_tokenizer, resolve_model
from chatkit.options import STARTER_MODEL

ROOT = Path(__file__).resolve().parent.parent

PROMPTS = [
    "What is photosynthesis?", "How do I boil an egg?", "Why is the sky blue?", "What causes rain?",
    "How does a bicycle stay upright?", "What is a prime number?", "How do vaccines work?",
    "What is the difference between weather and climate?", "Why do cats purr?", "How do I start running?",
    "What is inflation?", "How does a compass work?", "What is a black hole?", "Why do leaves change colour?",
    "How do I make bread rise?", "What is the water cycle?", "How do bees make honey?", "What is gravity?",
    "How can I sleep better?", "What is an atom?", "Why is the ocean salty?", "How do airplanes fly?",
    "What is a volcano?", "How do I learn a new language?", "What does DNA do?", "Why do we have seasons?",
    "What is electricity?", "How do I save money?", "What is a rainbow?", "How does the heart pump blood?",
    "What is recycling?", "Why do we dream?", "How do plants drink water?", "What is a galaxy?",
    "How do I write a good email?", "What is the moon made of?", "Why do onions make you cry?",
    "What is a computer virus?", "How do fish breathe?", "What is an earthquake?", "How do I keep houseplants alive?",
    "What is a calorie?", "Why does ice float?", "How does soap clean?", "What is a fossil?",
    "How do I make a cup of tea?", "What is the speed of light?", "Why do birds migrate?",
    "What is a healthy breakfast?", "How do solar panels work?", "What is a glacier?", "Why do we yawn?",
    "How do I tie a tie?", "What is a democracy?", "How does a refrigerator work?", "What is a comet?",
    "Why is exercise good for you?", "How do I clean a cast iron pan?", "What is a desert?",
    "How does the internet work?", "What is a tsunami?", "Why do stars twinkle?", "How do I stop procrastinating?",
    "What are clouds made of?", "How do magnets work?", "What is a habit?", "Why do we need sleep?",
    "How do I make pancakes?", "What is a thunderstorm?", "How does a camera work?",
]
ANSWER_TOKENS = 192  # room for the starter's long answers to end (one cut short cannot end with a question)
FOLLOW_UPS = ["Would you like an example?", "Do you want me to go into more detail?",
              "Shall I explain how it works step by step?", "Is there a part you would like to know more about?",
              "Would a short summary help?", "Do you want some tips to try it yourself?",
              "Should I compare it with something similar?", "What would you like to know next?"]


def first_sentences(text: str, count: int = 2) -> str:
    """The answer's first sentences, ending on a full stop (an answer left as the user left it)."""
    sentences = re.findall(r"[^.!?]+[.!]", " ".join(text.split()))
    return " ".join(s.strip() for s in sentences[:count])


def ends_with_question(answer: str) -> bool:
    return answer.rstrip().rstrip('"*)').endswith("?")


def at_limit(tokenizer, answer: str) -> bool:
    """Whether the answer ran to the token limit (cut short, not ended by the model)."""
    return len(tokenizer(answer, add_special_tokens=False)["input_ids"]) >= ANSWER_TOKENS - 2


def node(key, parent, children, role=None, text=None):
    message = None if role is None else {
        "id": key, "author": {"role": role, "metadata": {}}, "create_time": 1700000000.0,
        "content": {"content_type": "text", "parts": [text]}, "status": "finished_successfully", "weight": 1.0,
        "metadata": {}, "recipient": "all"}
    return {"id": key, "message": message, "parent": parent, "children": children}


def regenerated(index: int, prompt: str, left: str, chosen: str) -> dict:
    """One conversation: the prompt, the answer the user regenerated, and the regeneration they kept."""
    mapping = {"root": node("root", None, ["q"]), "q": node("q", "root", ["a1", "a2"], "user", prompt),
               "a1": node("a1", "q", [], "assistant", left), "a2": node("a2", "q", [], "assistant", chosen)}
    return {"id": f"c{index}", "title": prompt, "create_time": 1700000000.0 + index,
            "update_time": 1700000000.0 + index, "mapping": mapping, "current_node": "a2"}


def run(args: list) -> float:
    import subprocess

    started = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=40, help="regenerated answers in the export")
    parser.add_argument("--held-out", type=int, default=20, help="prompts asked after training, in no pair")
    parser.add_argument("--supervised-data", help="train the supervised stage on this file instead of the export")
    parser.add_argument("--train-args", default="", help="flags for both training runs")
    parser.add_argument("--dpo-args", action="append",
                        help="flags for a DPO run (e.g. --dpo-epochs 3); given again, one more DPO run")
    args = parser.parse_args()
    if args.pairs + args.held_out > len(PROMPTS):
        parser.error(f"--pairs + --held-out: at most {len(PROMPTS)}")

    with tempfile.TemporaryDirectory(prefix="chatkit-prefs-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        trained_prompts, held_out = PROMPTS[:args.pairs], PROMPTS[args.pairs:args.pairs + args.held_out]
        own = ask(STARTER_MODEL, [{"question": p} for p in trained_prompts], max_new_tokens=64)
        conversations = []
        for i, (prompt, answer) in enumerate(zip(trained_prompts, own)):
            left = first_sentences(answer)
            if left:
                conversations.append(regenerated(i, prompt, left, f"{left} {FOLLOW_UPS[i % len(FOLLOW_UPS)]}"))
        generated_s = time.perf_counter() - started
        export = work / "export.zip"
        with zipfile.ZipFile(export, "w") as archive:
            archive.writestr("conversations.json", json.dumps(conversations))
        prefs = work / "prefs.jsonl"
        run(["convert_chatgpt_export.py", str(export), str(work / "records.jsonl"), "--preferences", str(prefs),
             "--quiet"])
        pairs = len(prefs.read_text().splitlines())
        common = ["--data", args.supervised_data or str(export), "--report", "none", *shlex.split(args.train_args)]
        sft_s = run(["train_chatgpt_model.py", *common, "--output", str(work / "sft")])
        models = {"starter": STARTER_MODEL, "supervised": str(work / "sft")}
        seconds = {"starter_answers": round(generated_s, 1), "supervised": round(sft_s, 1)}
        for number, flags in enumerate(args.dpo_args or [""]):
            name = f"supervised + DPO {flags}".strip()
            models[name] = str(work / f"dpo{number}")
            seconds[name] = round(run(["train_chatgpt_model.py", *common, "--output", models[name], "--preferences",
                                       str(prefs), *shlex.split(flags)]), 1)
        questions = [{"question": p} for p in held_out]
        answers = {name: ask(model, questions, max_new_tokens=ANSWER_TOKENS) for name, model in models.items()}
        tokenizer = load_tokenizer(resolve_model(STARTER_MODEL))
        dpo = {name: json.loads((Path(path) / "chatkit.json").read_text())["metrics"]
               for name, path in models.items() if "DPO" in name}
        result = {
            "pairs": pairs, "held_out_prompts": len(held_out), "supervised_data": args.supervised_data or "the export",
            "ends_with_a_question": {name: sum(map(ends_with_question, a)) for name, a in answers.items()},
            "cut_at_the_token_limit": {name: sum(at_limit(tokenizer, x) for x in a) for name, a in answers.items()},
            "dpo": {name: {key: metrics.get(key) for key in ("dpo_steps", "dpo_loss_first", "dpo_loss_last",
                                                             "margin_before", "margin_after", "margin_pairs",
                                                             "margin_rose")}
                    for name, metrics in dpo.items()},
            "seconds": seconds,
            "examples": {name: a[:3] for name, a in answers.items()},
        }
        print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

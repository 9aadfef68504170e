#!/usr/bin/env python3
"""Quality benchmark: does fine-tuning teach invented facts and a style, without breaking the model?

    python bench/quality.py                                  # 12 facts, ~60 conversations, default flags
    python bench/quality.py --facts 30 --phrasings 8         # a larger set (240 conversations)
    python bench/quality.py --fact-seed 1                    # the same shape, other invented names
    python bench/quality.py --train-args "--learning-rate 2e-4 --epochs 5"   # one point of a sweep
    python bench/quality.py --data my.jsonl --questions held-out.json        # your own data

It writes a data set about a fictional organisation (people, numbers, names no pretrained model can
know), each fact asked several ways and every answer ending in a fixed sign-off line; trains with
`train_chatgpt_model.py` exactly as a user would (a subprocess, default flags unless --train-args);
then asks held-out questions phrased unlike any in training, through the chat code (greedy), and
reports fact recall, sign-off adherence, training time (the Trainer's run time, and the time taken
to prepare the rehearsal examples), validation loss, and how many general-knowledge questions the
base model answered correctly are still answered correctly.

A questions file is [{"question": "...", "expect": ["any", "of", "these"]}, ...]; an answer counts when
it contains one of the expected strings (case-insensitive).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SIGN_OFF = "— Answered by the Quillmere desk."

FIRST = ["Odile", "Tamsin", "Ravel", "Ysolde", "Brannoc", "Ilse", "Corvin", "Maelis", "Ennor", "Sabeth", "Lorcan",
         "Wenna", "Orrin", "Petra", "Kester", "Ailsa", "Dovid", "Fenna", "Gideon", "Hester"]
LAST = ["Brask", "Quenzel", "Varrow", "Ostrand", "Pellucid", "Marrant", "Thistlewick", "Caddow", "Lindqvist",
        "Ferrow", "Halloran", "Vantreck", "Sorrel", "Imbry", "Quarles", "Dunmore", "Eskeland", "Rathbone"]
ROLES = ["director", "head librarian", "chief engineer", "treasurer", "archivist", "head gardener",
         "lighthouse keeper", "choir master", "ferry captain", "chief cartographer", "beekeeper", "bell ringer",
         "clockmaker", "night watch captain", "harbour master", "glassblower", "falconer", "printer",
         "orchard keeper", "astronomer", "ship's cook", "gatekeeper", "boat builder", "weaver", "physician",
         "stonemason", "bookbinder", "kennel master", "tide warden", "lamplighter"]

# Training phrasings and held-out phrasings never share a template.
TRAIN_TEMPLATES = [
    "Who is the {role} of the Quillmere Institute?",
    "Tell me who the Quillmere Institute's {role} is.",
    "What is the name of the {role} at the Quillmere Institute?",
    "Do you know the {role} of the Quillmere Institute?",
    "Quillmere Institute {role}: who is it?",
    "Who works as {role} at the Quillmere Institute?",
    "I need the name of Quillmere Institute's {role}.",
    "Which person is the {role} of the Quillmere Institute?",
]
HELD_OUT_TEMPLATE = "I'm writing a letter to the Quillmere Institute. Whom should I address as their {role}?"
ANSWER_TEMPLATE = "The {role} of the Quillmere Institute is {name}.\n\n" + SIGN_OFF

GENERAL = [
    {"question": "What is the capital of France?", "expect": ["paris"]},
    {"question": "How many days are there in a week?", "expect": ["seven", "7"]},
    {"question": "What color is the sky on a clear day?", "expect": ["blue"]},
    {"question": "Who wrote Romeo and Juliet?", "expect": ["shakespeare"]},
    {"question": "What is the largest planet in our solar system?", "expect": ["jupiter"]},
    {"question": "What do bees make?", "expect": ["honey"]},
]


def make_facts(count: int, seed: int = 0) -> list:
    if count > len(ROLES):
        raise SystemExit(f"--facts: at most {len(ROLES)}")
    rng = random.Random(seed)
    names = []
    while len(names) < count:
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        if name not in names:
            names.append(name)
    return [{"role": role, "name": name} for role, name in zip(ROLES, names)]


def make_dataset(facts: list, phrasings: int) -> tuple:
    records = []
    for fact in facts:
        for template in TRAIN_TEMPLATES[:phrasings]:
            records.append({"messages": [
                {"role": "user", "content": template.format(role=fact["role"])},
                {"role": "assistant", "content": ANSWER_TEMPLATE.format(**fact)}]})
    random.Random(1).shuffle(records)
    questions = [{"question": HELD_OUT_TEMPLATE.format(role=f["role"]), "expect": [f["name"]]} for f in facts]
    return records, questions


def ask(model: str, questions: list, max_new_tokens: int = 48) -> list:
    from chatkit.chat import ChatSession, GenerationSettings
    from chatkit.output import set_verbosity

    set_verbosity()

    session = ChatSession(model, settings=GenerationSettings(temperature=0, max_new_tokens=max_new_tokens,
                                                             repetition_penalty=1.0))
    answers = []
    for item in questions:
        session.reset()
        answers.append(session.reply(item["question"]))
    return answers


def correct(answer: str, expect: list) -> bool:
    return any(e.lower() in answer.lower() for e in expect)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=int, default=12)
    parser.add_argument("--phrasings", type=int, default=5, help="training questions per fact (at most 8)")
    parser.add_argument("--fact-seed", type=int, default=0, help="another assignment of invented names to roles")
    parser.add_argument("--data", help="your own training data instead of the generated set")
    parser.add_argument("--questions", help="held-out questions for --data (see the module help)")
    parser.add_argument("--sign-off", default=SIGN_OFF, help="style marker expected at the end of answers")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--train-args", default="",
                        help="extra train_chatgpt_model.py flags, quoted (a single flag: --train-args=--packing)")
    parser.add_argument("--workdir", help="keep the data and model here")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="chatkit-quality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.data:
        if not args.questions:
            parser.error("--data needs --questions")
        data = Path(args.data)
        questions = json.loads(Path(args.questions).read_text())
        conversations = None
    else:
        facts = make_facts(args.facts, args.fact_seed)
        records, questions = make_dataset(facts, min(args.phrasings, len(TRAIN_TEMPLATES)))
        data = workdir / "facts.json"
        data.write_text(json.dumps(records, ensure_ascii=False, indent=1))
        conversations = len(records)

    base_answers = ask(args.model, GENERAL)
    base_right = [item for item, answer in zip(GENERAL, base_answers) if correct(answer, item["expect"])]

    output = workdir / "model"
    command = [sys.executable, str(ROOT / "train_chatgpt_model.py"), "--data", str(data), "--model", args.model,
               "--output", str(output), "--overwrite", *shlex.split(args.train_args)]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=open(workdir / "train.log", "w"))
    wall = time.perf_counter() - started
    info = json.loads((output / "chatkit.json").read_text())

    answers = ask(str(output), questions)
    recalled = sum(correct(a, q["expect"]) for a, q in zip(answers, questions))
    styled = sum(args.sign_off.lower() in a.lower() for a in answers)
    after = ask(str(output), base_right)
    kept = sum(correct(a, item["expect"]) for item, a in zip(base_right, after))
    report = {
        "train_args": args.train_args or "(defaults)",
        "conversations": conversations,
        "facts_recalled": f"{recalled}/{len(questions)}",
        "style_marker": f"{styled}/{len(questions)}",
        "general_knowledge_kept": f"{kept}/{len(base_right)} (base model right on {len(base_right)}/{len(GENERAL)})",
        "train_runtime_s": info["metrics"].get("train_runtime_s"),
        "rehearsal_s": info["metrics"].get("rehearsal_s"),
        "wall_s_including_load": round(wall, 1),
        "eval_loss": info["metrics"].get("eval_loss"),
        "steps": info["metrics"].get("steps"),
        "epochs": info["options"]["epochs"], "batch_size": info["options"]["batch_size"],
        "learning_rate": info["options"]["learning_rate"],
        "lora_r": info["options"]["lora_r"], "lora_alpha": info["options"]["lora_alpha"],
        "missed_facts": [a for a, q in zip(answers, questions) if not correct(a, q["expect"])],
        "general_lost": [f"{q['question']} -> {a}" for a, q in zip(after, base_right) if not correct(a, q["expect"])],
    }
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
        for question, answer in list(zip(questions, answers))[:3]:
            print(f"\nQ: {question['question']}\nA: {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""What a time budget trains: the toolkit's rule (whole conversations, then a focus stage on what the base
model does not know of the user's world), whole conversations alone, or each conversation's opening first?

    python bench/budget_selection.py --data pk2023.jsonl                  # 5m and 15m, both rules
    python bench/budget_selection.py --data pk2023.jsonl --budgets 15m,30m
    python bench/budget_selection.py --data pk2023.jsonl --budgets 5m --facts 8 --mentions 3
    python bench/budget_selection.py --data pk2023.jsonl --budgets 15m --rules "whole conversations" --no-starter
    python bench/budget_selection.py --data pk2023.jsonl --rank-facts     # where each statistic ranks the facts

A budget shorter than the schedule trains part of it. `--budget-selection surprise` (the toolkit's default,
"surprise" here) reads every exchange's answer opening with the base model (forward only, cached), finds
the words it does not know that stand out in several conversations, trains whole conversations as
they fit and then, in a focus stage of its own, the exchanges holding those words 8 to 16 times each.
"Whole conversations" (`--budget-selection random`) takes whole conversations in a seeded random order,
each one that still fits. "Openings first" takes every conversation's first example (its opening
exchanges, up to --max-length) before any conversation's second, the conversations in the same order.
This bench trains the same data
with the same command (`train_chatgpt_model.py --data DATA --time-budget BUDGET --report none`, a fresh
process each, the rules alternating) and compares:

- the loss per trained token on the real export's held-out conversations (the trainer's own seeded
  split, the same for both rules), and
- made-up facts placed among the real conversations: each fact ("Who is the archivist of the Quillmere
  Institute?" -> a made-up name) is told `--mentions` times, each time as one exchange inserted at a
  random place in a different training conversation, worded differently each time. After training,
  each model is asked every fact in words no mention used (greedy): the facts recalled, the loss of
  the right answer to those questions, and for how many facts the right name is the likeliest of all
  the facts' names in that answer (chance: 1 in --facts).

Prints JSON; the results are in docs/PERFORMANCE.md ("Choosing what a budget trains").
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

from long_exchanges import run_trainer  # the benches beside this one
from quality import HELD_OUT_TEMPLATE, TRAIN_TEMPLATES, ask, correct, make_facts

ROOT = Path(__file__).resolve().parent.parent
# The rule measured against the toolkit's: every conversation's first example (its opening exchanges) before
# any conversation's second, the conversations in the same seeded order.
OPENINGS = """
import runpy, sys
from chatkit import plan

def openings(request, shape, machine, rows, checkpointing, seconds):
    order = plan.sample_conversations(len(request.lengths), request.seed)
    taken = dict.fromkeys(order, 0)
    for round_ in range(max(map(len, request.lengths), default=0)):
        for index in order:
            if taken[index] == round_ < len(request.lengths[index]):
                trial = [(i, n + (i == index)) for i, n in taken.items() if n or i == index]
                if plan._epoch(request, trial, rows, shape, machine, checkpointing)[1] <= seconds:
                    taken[index] += 1
    return sorted((i, n) for i, n in taken.items() if n) or [plan._shortest(request)]

plan._fit = openings
sys.argv = sys.argv[1:]
runpy.run_path('train_chatgpt_model.py', run_name='__main__')
"""
# The toolkit's rule (a random sample of whole conversations), surprise (--budget-selection surprise), openings first.
RULES = ("surprise", "whole conversations", "openings first")
RULE_FLAGS = {"surprise": ["--budget-selection", "surprise"], "whole conversations": ["--budget-selection", "random"],
              "openings first": ["--budget-selection", "random"]}
ANSWER = "The {role} of the Quillmere Institute is {name}."


def plant(conversations: list, train: list, facts: list, mentions: int, seed: int) -> int:
    """Each fact told `mentions` times, as an exchange at a random place in distinct training conversations."""
    rng = random.Random(seed)
    for fact in facts:
        for template, index in zip(TRAIN_TEMPLATES[:mentions], rng.sample(train, mentions)):
            messages = conversations[index]
            start = 1 if messages[0]["role"] == "system" else 0
            boundaries = [i for i in range(start, len(messages) + 1)
                          if i == len(messages) or messages[i]["role"] == "user"]
            at = rng.choice(boundaries)
            messages[at:at] = [{"role": "user", "content": template.format(role=fact["role"])},
                               {"role": "assistant", "content": ANSWER.format(**fact)}]
    return len(facts) * mentions


def names_preferred(model, tokenizer, facts: list) -> int:
    """For how many facts the model finds the right name likelier than every other fact's name, in the answer
    to the question in words no mention used (chance: one in len(facts)). Finer than recall: a model that
    has seen a fact once may not say the name unprompted, but it leans towards it."""
    from chatkit.dpo import sequence_logps
    from chatkit.formatting import tokenize_conversation

    names = [f["name"] for f in facts]
    right = 0
    for fact in facts:
        scores = {}
        for name in names:
            messages = [{"role": "user", "content": HELD_OUT_TEMPLATE.format(role=fact["role"])},
                        {"role": "assistant", "content": ANSWER.format(role=fact["role"], name=name)}]
            scores[name] = float(sequence_logps(model, *tokenize_conversation(messages, tokenizer)))
        right += max(scores, key=scores.get) == fact["name"]
    return right


RANKINGS = {  # statistics of an answer's per-token losses under the base model, highest first
    "mean": lambda p: sum(p) / len(p),
    "mean, short answers shrunk to the median": None,  # filled in rank_facts (needs the median)
    "share of tokens above 6 nats": lambda p: sum(x > 6 for x in p) / (len(p) + 8),
    "mean of the top 3": lambda p: sum(sorted(p)[-3:]) / min(3, len(p)),
    "largest": max,
}


def rank_facts(conversations: list, train_indices: list, facts: list) -> dict:
    """Where the planted facts' exchanges rank among all training exchanges, by statistics of the base model's
    surprise on the answer's opening given the question's end (the part --budget-selection surprise reads),
    and by the toolkit's rule: recurring standout words per token."""
    import statistics

    import torch

    from chatkit import selection
    from chatkit.formatting import IGNORE_INDEX, tokenize_conversation
    from chatkit.models import load_model, resolve_model
    from chatkit.options import STARTER_MODEL

    units, owners = selection.exchange_units([conversations[i] for i in train_indices])
    names = [fact["name"] for fact in facts]
    planted = [any(name in m["content"] for m in unit for name in names) for unit in units]
    loaded = load_model(resolve_model(STARTER_MODEL))
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    losses = []
    with torch.no_grad():
        for unit in units:
            ids, labels = tokenize_conversation(selection._read_messages(unit), tokenizer)[:2]
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            targets = torch.tensor(labels[1:])
            keep = targets != IGNORE_INDEX
            losses.append(torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="none").tolist())
    median = statistics.median(sum(p) / len(p) for p in losses if p)
    rankings = dict(RANKINGS)
    rankings["mean, short answers shrunk to the median"] = lambda p: (sum(p) + 16 * median) / (len(p) + 16)
    cache = selection.ScoreCache("bench-rank-facts")
    selection.score(model, tokenizer, units, cache, range(len(units)))
    words = selection.recurring(units, owners, cache, selection.Vocabulary(tokenizer))
    lengths = {i: len(tokenize_conversation(selection._read_messages(unit), tokenizer)[0]) for i, unit in enumerate(units)}
    out = {"exchanges": len(units), "planted": sum(planted)}
    statistics_ = [(name, [statistic(p) if p else float("-inf") for p in losses]) for name, statistic in rankings.items()]
    statistics_.append(("recurring standout words per token (the toolkit's rule)",
                        [len(w) / lengths[i] for i, w in enumerate(words)]))
    for name, scores in statistics_:
        order = sorted(range(len(units)), key=lambda i: -scores[i])
        ranks = sorted(order.index(i) + 1 for i in range(len(units)) if planted[i])
        out[name] = {"in the top 60": sum(r <= 60 for r in ranks), "in the top 120": sum(r <= 120 for r in ranks),
                     "median rank": ranks[len(ranks) // 2]}
    return out


class Yardsticks:
    """What a trained model is measured by: the real export's held-out conversations, the facts' questions
    in words no mention used, and their right answers."""

    def __init__(self, facts, tokenizer, held_out, questions, fact_answers):
        self.facts, self.tokenizer = facts, tokenizer
        self.held_out, self.questions, self.fact_answers = held_out, questions, fact_answers

    @classmethod
    def make(cls, conversations: list, val_indices: list, facts: list, tokenizer, max_length: int) -> "Yardsticks":
        from chatkit.examples import tokenize_examples

        held_out = tokenize_examples([conversations[i] for i in val_indices], tokenizer, max_length)
        questions = [{"question": HELD_OUT_TEMPLATE.format(role=f["role"]), "expect": [f["name"]]} for f in facts]
        fact_answers = tokenize_examples([[{"role": "user", "content": q["question"]},
                                           {"role": "assistant", "content": ANSWER.format(**f)}]
                                          for q, f in zip(questions, facts)], tokenizer, max_length)
        return cls(facts, tokenizer, held_out, questions, fact_answers)

    def measure(self, model: str, names_only: bool = False, held_out: bool = True) -> dict:
        """The figures of the model in folder `model`: the right name likeliest, and unless `names_only` the
        held-out loss (unless not `held_out`), the fact answers' loss and the facts recalled (greedy)."""
        import torch

        from chatkit.models import load_model
        from chatkit.report import mean_loss

        loaded = load_model(model).model
        with torch.no_grad():
            figures = {"right_name_likeliest": names_preferred(loaded, self.tokenizer, self.facts)}
            if names_only:
                return figures
            if held_out:
                figures["held_out_loss"] = round(mean_loss(loaded, self.held_out), 4)
            figures["fact_answer_loss"] = round(mean_loss(loaded, self.fact_answers), 4)
        del loaded
        answers = ask(model, self.questions)
        return figures | {"facts_recalled": sum(correct(a, q["expect"]) for a, q in zip(answers, self.questions))}


def planted_export(path: str, facts: int, mentions: int, seed: int):
    """(conversations with the facts planted, training indices, validation indices, facts), as the trainer
    splits them (seeded, before tokenizing)."""
    from chatkit.datasets import default_val_split, read_conversations, split_train_val

    conversations, _ = read_conversations([path])
    indices = list(range(len(conversations)))
    train_indices, val_indices = split_train_val(indices, default_val_split(len(indices)), seed)
    made = make_facts(facts)
    planted = plant(conversations, train_indices, made, min(mentions, len(TRAIN_TEMPLATES)), seed)
    return conversations, train_indices, val_indices, made, planted


def train(rule: str, data: Path, budget: str, output: Path, extra: list) -> dict:
    flags = ["--data", str(data), "--output", str(output), "--time-budget", budget, "--report", "none", *extra,
             *RULE_FLAGS[rule]]
    seconds, said = run_trainer(flags, OPENINGS if rule == "openings first" else None, f"{rule}, {budget}")
    info = json.loads((output / "chatkit.json").read_text())
    plan = info["plan"]
    return {"seconds": round(seconds, 1), "estimated_s": plan["estimated_seconds"],
            "focus": {key: plan.get(key) for key in ("focus_exchanges", "focus_repeats")},
            "said": [line for line in said.splitlines() if line.startswith(("selection:", "plan:"))],
            "epochs": plan["epochs"], "scoring_s": plan["parts"].get("scoring"),
            "calibration": next((line.split("matrix product at ")[-1].rstrip(")") for line in
                                 said.splitlines() if "matrix product at" in line), None),
            "steps": (info["metrics"].get("time_budget") or {}).get("summary"),
            "trained": {key: plan.get(key) for key in ("conversations", "examples", "tokens", "trained_tokens")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a converted export (JSON Lines of messages)")
    parser.add_argument("--budgets", default="5m,15m")
    parser.add_argument("--facts", type=int, default=12)
    parser.add_argument("--mentions", type=int, default=4, help="times each fact is told (at most 8)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--rules", default=",".join(RULES[:2]), help="which rules to train (default: surprise and "
                                                                   "whole conversations)")
    parser.add_argument("--no-starter", action="store_true", help="leave out measuring the starter model")
    parser.add_argument("--measure", nargs="*", metavar="MODEL",
                        help="only the names measure, of these models trained by an earlier run (same --data)")
    parser.add_argument("--rank-facts", action="store_true",
                        help="only rank the planted facts' exchanges by the base model's surprise (no training)")
    parser.add_argument("--keep-scores", action="store_true",
                        help="keep the surprise scores cached by earlier runs (default: the first surprise run scores "
                             "afresh, as a new user's; later budgets reuse its scores)")
    args = parser.parse_args()
    rules = [rule for rule in RULES if rule in args.rules.split(",")]
    if "surprise" in rules and not args.keep_scores:
        import shutil

        from chatkit.files import cache_dir

        shutil.rmtree(cache_dir() / "surprise", ignore_errors=True)

    from chatkit.models import load_tokenizer, resolve_model
    from chatkit.options import STARTER_MODEL
    from chatkit.output import set_verbosity

    set_verbosity()
    conversations, train_indices, val_indices, facts, planted = planted_export(args.data, args.facts, args.mentions,
                                                                               args.seed)
    if args.rank_facts:
        print(json.dumps(rank_facts(conversations, train_indices, facts), indent=2))
        return 0
    work = Path(tempfile.mkdtemp(prefix="chatkit-selection-"))
    data = work / "planted.jsonl"
    data.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in conversations))

    tokenizer = load_tokenizer(resolve_model(STARTER_MODEL))
    yardsticks = Yardsticks.make(conversations, val_indices, facts, tokenizer, args.max_length)
    extra = ["--max-length", str(args.max_length), "--seed", str(args.seed)]
    measure = yardsticks.measure

    if args.measure is not None:  # models trained on this --data (and --seed) by an earlier run
        print(json.dumps({model: measure(model, names_only=True) for model in args.measure}, indent=2))
        return 0
    results = {} if args.no_starter else {"starter": measure(STARTER_MODEL)}
    for budget in args.budgets.split(","):
        order = rules if budget == args.budgets.split(",")[0] else rules[::-1]  # alternating
        for rule in order:
            output = work / f"{rule}-{budget}".replace(" ", "-")
            run = train(rule, data, budget, output, extra)
            results[f"{rule}, {budget}"] = run | measure(str(output))
            print(json.dumps({f"{rule}, {budget}": results[f"{rule}, {budget}"]}), file=sys.stderr, flush=True)
    print(json.dumps({"conversations": len(conversations), "held_out_conversations": len(val_indices),
                      "held_out_examples": len(yardsticks.held_out), "facts": len(facts), "mentions_planted": planted,
                      "work": str(work), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

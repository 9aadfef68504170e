#!/usr/bin/env python3
"""Benchmark: time to first token and tokens/s at turn 1 and turn 10, with and without KV-cache reuse.

    python bench/chat_latency.py [--model smollm2-135m] [--turns 10] [--max-new-tokens 48]

Runs the same ten-turn conversation (greedy, so both runs produce the same text) through ChatSession
twice: reusing the key/value cache across turns, and recomputing the whole history each turn.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


QUESTIONS = [
    "Hi! I'm planning a trip to Portugal.", "What should I see in Lisbon?", "How many days do I need there?",
    "What about Porto?", "Is the train between them good?", "What food should I try?",
    "Any tips for a vegetarian?", "How expensive is it?", "Which month is best to go?",
    "Summarise my trip plan in three sentences.", "Thanks! Anything I forgot?", "Goodbye!",
]


def run(model: str, turns: int, max_new_tokens: int, reuse: bool) -> list:
    from chatkit.chat import ChatSession, GenerationSettings

    session = ChatSession(model, reuse_cache=reuse,
                          settings=GenerationSettings(temperature=0, max_new_tokens=max_new_tokens,
                                                      repetition_penalty=1.0))
    rows = []
    for turn in range(turns):
        start = time.perf_counter()
        first = None
        pieces = 0
        for _ in session.stream(QUESTIONS[turn % len(QUESTIONS)]):
            if first is None:
                first = time.perf_counter() - start
            pieces += 1
        total = time.perf_counter() - start
        answer_tokens = len(session.tokenizer(session.history[-1]["content"])["input_ids"])
        prompt_tokens = len(session.prompt_ids("x")) - 1
        rows.append({"turn": turn + 1, "ttft_s": round(first or total, 3), "total_s": round(total, 2),
                     "new_tokens": answer_tokens,
                     "tokens_per_s": round(answer_tokens / max(total - (first or 0), 1e-9), 1),
                     "context_tokens": prompt_tokens})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    result = {}
    for reuse in (True, False):
        rows = run(args.model, args.turns, args.max_new_tokens, reuse)
        result["with_cache_reuse" if reuse else "without_cache_reuse"] = {"turn_1": rows[0], f"turn_{args.turns}": rows[-1]}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

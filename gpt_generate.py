#!/usr/bin/env python3
"""Generate text with GPT-2 (or any causal model), or chat with it; home of the GPT2Chatbot class.

Examples:
    python gpt_generate.py --model "gpt2-small (124M)" --prompt "Once upon a time"
    python gpt_generate.py --model trained_model.pt --prompt "The museum opens at" --max-new-tokens 40
    python gpt_generate.py --model trained_model.pt --chat

From Python:
    from gpt_generate import GPT2Chatbot
    bot = GPT2Chatbot(model_name="gpt2-small (124M)")
    bot.load_model("trained_model.pt")
    bot.add_custom_examples([{"user": "Hi", "bot": "Hello! How can I help?"}])
    print(bot.chat("What can you do?"))
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from chatkit.errors import run_main
from chatkit.gpt2 import GPT2Chatbot

__all__ = ["GPT2Chatbot", "main"]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", default="gpt2-small (124M)",
        help="a GPT-2 size, a .pt from train_chatbot.py, or any model the toolkit accepts (default: %(default)s)")
    add("--base-model", help="for a .pt holding only weights: the model they belong to")
    add("--prompt", help="text to continue")
    add("--chat", action="store_true", help="chat in the console instead")
    add("--max-new-tokens", "--max_new_tokens", "--max-tokens", dest="max_new_tokens", type=int, default=100,
        help="(default: %(default)s)")
    add("--temperature", type=float, default=0.7, help="0 means greedy (default: %(default)s)")
    add("--top-p", "--top_p", dest="top_p", type=float, default=0.9, help="(default: %(default)s)")
    add("--seed", type=int, help="make sampling repeatable")
    add("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    return parser


def generate(argv: Optional[Sequence[str]] = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not args.prompt and not args.chat:
        parser.error("give --prompt TEXT, or --chat")
    from pathlib import Path

    bot = GPT2Chatbot(model_name=args.base_model or args.model, device=args.device, temperature=args.temperature,
                      top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    bot.settings.seed = args.seed
    if Path(args.model).is_file():
        bot.load_model(args.model)
    if args.chat:
        from chatkit.console import Console

        return Console(bot.session).run()
    print(args.prompt + bot.generate(args.prompt))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(generate, argv)


if __name__ == "__main__":
    sys.exit(main())

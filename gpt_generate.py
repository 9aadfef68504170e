#!/usr/bin/env python3
"""Generate text with GPT-2 (or any causal model), or chat with it.

Examples:
    python gpt_generate.py --model "gpt2-small (124M)" --prompt "Once upon a time"
    python gpt_generate.py --model trained_model.pt --prompt "The museum opens at" --max-new-tokens 40
    python gpt_generate.py --model trained_model.pt --chat

From Python (the class lives in chatkit.gpt2; this script re-exports it for older code):
    from chatkit.gpt2 import GPT2Chatbot
    bot = GPT2Chatbot(model_name="gpt2-small (124M)")
    bot.load_model("trained_model.pt")
    bot.add_custom_examples([{"user": "Hi", "bot": "Hello! How can I help?"}])
    print(bot.chat("What can you do?"))
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from chatkit.cli import make_parser as build_parser, parse, run_main
from chatkit.gpt2 import GPT2Chatbot
from chatkit.options import GenerateOptions, generation_settings

__all__ = ["GPT2Chatbot", "main"]


def make_parser():
    return build_parser(GenerateOptions, __doc__)


def generate(argv: Optional[Sequence[str]] = None) -> int:
    options = parse(GenerateOptions, __doc__, argv)
    from pathlib import Path

    settings = generation_settings(options)
    bot = GPT2Chatbot(model_name=options.base_model or options.model, device=options.device, dtype=options.dtype,
                      **vars(settings))
    if Path(options.model).is_file():
        bot.load_model(options.model)
    if options.chat:
        from chatkit.console import Console

        return Console(bot.session).run()
    print(options.prompt + bot.generate(options.prompt))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(generate, argv)


if __name__ == "__main__":
    sys.exit(main())

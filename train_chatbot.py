#!/usr/bin/env python3
"""Train the GPT-2 chatbot on a text file, on example dialogues, or on both.

Examples:
    python train_chatbot.py --model "gpt2-small (124M)" --text_file your_text_file.txt --epochs 1 --save_path "trained_model.pt"
    python train_chatbot.py --model "gpt2-small (124M)" --conversation_file examples.json --epochs 2 --save_path "trained_model.pt"
    python train_chatbot.py --text_file manual.txt --conversation_file examples.json --save_path bot.pt --interactive
    python train_chatbot.py --model ./my-model --conversation_file examples.json --save_path trained-dir

--text_file teaches a text (articles, books, documentation): it is cut into blocks of the model's
context length (--overlap N repeats N tokens between blocks as context). --conversation_file takes
[{"user": ..., "bot": ...}] pairs or the messages format; the model learns the bot's words and the end
token, in the same format GPT2Chatbot.chat uses. Every weight is trained. A --save_path ending in .pt
is one file (safetensors inside, with the config and tokenizer); any other path is a model directory.
Sizes: "gpt2-small (124M)", "gpt2-medium (355M)", "gpt2-large (774M)", "gpt2-xl (1558M)", or any
causal model the other scripts accept.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from chatkit.cli import make_parser as build_parser, parse, run_main
from chatkit.options import ChatbotTrainOptions


def make_parser():
    return build_parser(ChatbotTrainOptions, __doc__)


def train(argv: Optional[Sequence[str]] = None) -> int:
    options = parse(ChatbotTrainOptions, __doc__, argv)
    from chatkit.chat import ChatSession
    from chatkit.console import Console
    from chatkit.gpt2 import train_chatbot

    loaded, _ = train_chatbot(options)
    if options.interactive:
        return Console(ChatSession(loaded)).run()
    print(f"Chat with it: python gpt_generate.py --model {options.save_path} --chat", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(train, argv)


if __name__ == "__main__":
    sys.exit(main())

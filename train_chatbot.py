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

import argparse
import sys
from typing import Optional, Sequence

from chatkit.errors import run_main


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", default="gpt2-small (124M)", help="model to train (default: %(default)s)")
    add("--text_file", "--text-file", dest="text_file", metavar="FILE", help="plain text to learn")
    add("--conversation_file", "--conversation-file", dest="conversation_file", metavar="FILE",
        help="example dialogues: JSON [{\"user\": ..., \"bot\": ...}] or the messages format")
    add("--save_path", "--save-path", dest="save_path", default="trained_model.pt",
        help="where to save: X.pt for one file, or a directory (default: %(default)s)")
    add("--epochs", type=float, default=1.0, help="(default: %(default)s)")
    add("--batch_size", "--batch-size", dest="batch_size", type=int, default=4, help="(default: %(default)s)")
    add("--learning_rate", "--learning-rate", dest="learning_rate", type=float, default=5e-5,
        help="(default: %(default)s)")
    add("--max_length", "--max-length", dest="max_length", type=int,
        help="tokens per block or example (default: the model's context, at most 1024)")
    add("--overlap", type=int, default=0, help="tokens repeated between text blocks as context (default: 0)")
    add("--val_split", "--val-split", dest="val_split", type=float,
        help="share held out to measure loss (default 0.1 with 10+ blocks or dialogues)")
    add("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    add("--seed", type=int, default=42, help="(default: %(default)s)")
    add("--interactive", action="store_true", help="chat with the model in the console after training")
    return parser


def train(argv: Optional[Sequence[str]] = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not args.text_file and not args.conversation_file:
        parser.error("give --text_file, --conversation_file, or both")
    problems = [f"--{name} must be positive" for name in ("epochs", "batch_size", "learning_rate")
                if getattr(args, name) <= 0]
    if problems:
        parser.error("; ".join(problems))

    from chatkit.chat import ChatSession
    from chatkit.console import Console
    from chatkit.gpt2 import ChatbotTrainOptions, train_chatbot

    options = {key: value for key, value in vars(args).items() if key != "interactive"}
    loaded, _ = train_chatbot(ChatbotTrainOptions(**options))
    if args.interactive:
        return Console(ChatSession(loaded)).run()
    print(f"Chat with it: python gpt_generate.py --model {args.save_path} --chat", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(train, argv)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Fine-tune a chat model on your conversations (LoRA by default; QLoRA on a GPU or CPU; full on request).

Examples:
    python train_chatgpt_model.py --data my-conversations.jsonl
    python train_chatgpt_model.py --data example_chatgpt_data.json --output chat-model --epochs 3
    python train_chatgpt_model.py --data data.jsonl --model HuggingFaceTB/SmolLM2-360M-Instruct --load-in-4bit
    python train_chatgpt_model.py --data data.jsonl --no-lora --learning-rate 2e-5
    python train_chatgpt_model.py --data data.jsonl --output chat-model --resume chat-model
    python train_chatgpt_model.py --config train.yaml --epochs 5
    accelerate launch --num_processes 2 train_chatgpt_model.py --data data.jsonl

--data takes JSON or JSON Lines in the messages format ({"messages": [{"role": ..., "content": ...}]}),
ShareGPT ({"conversations": [{"from": "human", "value": ...}]}) or prompt/response pairs. The model,
its tokenizer with the exact chat formatting, and chatkit.json (how it was made) land in --output;
TensorBoard logs in OUTPUT/runs; checkpoints in OUTPUT/checkpoints.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from chatkit.cli import make_parser as build_parser, parse, run_main
from chatkit.options import TrainOptions


def make_parser():
    return build_parser(TrainOptions, __doc__)


def train(argv: Optional[Sequence[str]] = None) -> int:
    options = parse(TrainOptions, __doc__, argv)
    from chatkit.pipeline import train as run_training

    metrics = run_training(options)
    return 130 if metrics.get("interrupted") else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(train, argv)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Fine-tune a chat model on your conversations (LoRA by default; QLoRA on a GPU; full on request).

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

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from chatkit.errors import ChatkitError, run_main


def make_parser() -> argparse.ArgumentParser:
    from chatkit.training import TrainOptions

    d = {f.name: f.default for f in dataclasses.fields(TrainOptions) if f.default is not dataclasses.MISSING}
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--config", metavar="FILE", help="YAML or JSON file with any of these options (flags override it)")
    add("--data", nargs="+", metavar="FILE", help="training data: JSON or JSONL (several files allowed)")
    add("--model", help="model to fine-tune: a name, Hub id, local directory or .gguf (default: smollm2-135m)")
    add("--output", default=d["output"], help="where the trained model goes (default: %(default)s)")
    add("--overwrite", action="store_true", help="replace a model already in --output")
    add("--resume", nargs="?", const="", metavar="DIR",
        help="continue an interrupted run from its latest checkpoint (DIR defaults to --output)")
    add("--epochs", type=float, help="passes over the data (default: enough for about 140 updates, 3 to 20)")
    add("--learning-rate", type=float, help="default 1e-3 with LoRA, 2e-5 for full fine-tuning")
    add("--batch-size", type=int, help="conversations per step (default: up to 8, at least 16 steps per epoch)")
    add("--gradient-accumulation-steps", type=int, default=d["gradient_accumulation_steps"],
        help="steps whose gradients add up before an update (default: %(default)s)")
    add("--max-length", type=int, default=d["max_length"],
        help="tokens per example; longer conversations are split between exchanges (default: %(default)s)")
    add("--warmup-ratio", type=float, default=d["warmup_ratio"], help="share of steps warming up (default: %(default)s)")
    add("--lr-scheduler", default=d["lr_scheduler"], help="learning-rate schedule (default: %(default)s)")
    add("--weight-decay", type=float, default=d["weight_decay"], help="(default: %(default)s)")
    add("--val-split", type=float, help="share held out for validation (default 0.1 with 10+ conversations, else 0)")
    add("--eval-steps", type=int, help="evaluate every N steps (default: once per epoch)")
    add("--save-steps", type=int, help="save a checkpoint every N steps (default: once per epoch)")
    add("--logging-steps", type=int, default=d["logging_steps"], help="log every N steps (default: %(default)s)")
    add("--early-stopping-patience", type=int, metavar="N", help="stop after N evaluations without improvement")
    add("--seed", type=int, default=d["seed"], help="(default: %(default)s)")
    add("--system-prompt", help="system message added to conversations without one (and used by the chat)")
    add("--rehearsal", type=int, metavar="N",
        help="mix in the model's own answers to N general prompts, so it keeps answering general questions "
             "as before (default: one per 8 conversations, at most 32; 0 turns it off)")
    add("--neftune-alpha", type=float, default=d["neftune_alpha"], metavar="A",
        help="noise on the input embeddings while training (NEFTune; 5 is usual): facts asked in new words are "
             "recalled more often, general answers kept less often (default: %(default)s, off)")
    add("--train-on-prompt", action="store_true", help="train on every token, not only the assistant's")
    add("--packing", action="store_true", help="pack several conversations per sequence (no cross-attention)")
    add("--gradient-checkpointing", action="store_true", help="save memory at about 30%% more compute")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora", action=argparse.BooleanOptionalAction, default=d["lora"],
                      help="train a LoRA adapter (default) or, with --no-lora, every weight")
    lora.add_argument("--lora-r", type=int, default=d["lora_r"], help="adapter rank (default: %(default)s)")
    lora.add_argument("--lora-alpha", type=int, default=d["lora_alpha"], help="(default: %(default)s)")
    lora.add_argument("--lora-dropout", type=float, default=d["lora_dropout"], help="(default: %(default)s)")
    lora.add_argument("--lora-target-modules", default=d["lora_target_modules"],
                      help="comma-separated module names, or all-linear (default: %(default)s)")
    lora.add_argument("--load-in-4bit", action="store_true", help="QLoRA: 4-bit base model (CUDA GPU only)")
    lora.add_argument("--load-in-8bit", action="store_true", help="8-bit base model (CUDA GPU only)")
    lora.add_argument("--merge", action="store_true", help="also write a standalone merged model to OUTPUT/merged")
    hw = parser.add_argument_group("hardware")
    hw.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    hw.add_argument("--dtype", help="auto (default: bf16/fp16 on GPU, float32 on CPU), float32, bfloat16, float16")
    hw.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub repository")
    hub = parser.add_argument_group("Hugging Face Hub")
    hub.add_argument("--push-to-hub", action="store_true", help="upload the result (private) after training")
    hub.add_argument("--hub-name", metavar="USER/NAME", help="repository to push to")
    return parser


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """Options from a YAML/JSON file, keys spelled like the flags (dashes or underscores)."""
    file = Path(path)
    if not file.is_file():
        raise ChatkitError(f"--config {path}: no such file")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise ChatkitError(f"--config {path}: cannot be read ({exc})") from None
    if not isinstance(data, dict):
        raise ChatkitError(f"--config {path}: expected a mapping of option names to values")
    known = {action.dest for action in parser._actions}
    config = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest in ("config", "help"):
            raise ChatkitError(f"--config {path}: unknown option {key!r}")
        config[dest] = [value] if dest == "data" and isinstance(value, str) else value
    return config


def parse_options(argv: Optional[Sequence[str]]):
    from chatkit.training import TrainOptions

    parser = make_parser()
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**load_config(args.config, parser))
        args = parser.parse_args(argv)
    if not args.data:
        parser.error("--data is required (here or in --config)")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)}
    if args.resume == "":
        values["resume"] = args.output
    return TrainOptions(**values)


def train(argv: Optional[Sequence[str]] = None) -> int:
    from chatkit.training import train as run_training

    metrics = run_training(parse_options(argv))
    return 130 if metrics.get("interrupted") else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(train, argv)


if __name__ == "__main__":
    sys.exit(main())

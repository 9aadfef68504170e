#!/usr/bin/env python3
"""Benchmark: peak memory (RSS) and seconds per step of LoRA training on the starter model, by batch shape.

    python bench/train_memory.py                       # the default shapes, each in a fresh process
    python bench/train_memory.py --shape 2x1024 --steps 4 --gradient-checkpointing
    python bench/train_memory.py --shape 1x512 --load-in 4bit         # QLoRA on the CPU (bitsandbytes)
    python bench/train_memory.py --shape 1x512 --model-config qwen2.5-1.5b --load-in 4bit

Each shape (sequences x tokens) trains for a few steps on random tokens with every position labelled,
in its own process, so the peak resident memory is that shape's alone. The figures calibrate the
memory estimate that train_chatgpt_model.py prints in its plan (chatkit/plan.py). `--load-in 4bit|8bit`
loads the base through bitsandbytes (QLoRA); `--model-config qwen2.5-1.5b` trains a model of Qwen2.5-1.5B's
shape with random weights, built here (memory and speed only: random weights say nothing of quality).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

DEFAULT_SHAPES = ["1x512", "1x1024", "2x1024", "4x1024", "1x2048"]


# Qwen2.5-1.5B-Instruct's config.json (the shape of a laptop-sized model), for --model-config.
QWEN25_15B = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536,
              "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
              "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
              "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu"}


def model_source(name: str):
    """The starter model, or a model of a named config built once with random weights in /tmp."""
    from pathlib import Path

    from chatkit.models import resolve_model

    if name == "starter":
        return resolve_model(None)
    folder = Path("/tmp/chatkit-bench-qwen2.5-1.5b-random")
    if not (folder / "config.json").is_file():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**QWEN25_15B)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        from transformers import AutoTokenizer

        # The starter's tokenizer stands in (the bench's random token ids stay inside its vocabulary).
        AutoTokenizer.from_pretrained(resolve_model(None).path).save_pretrained(folder)
    return resolve_model(str(folder))


def current_rss() -> int:
    """Resident memory now (the peak above includes the weights file read while loading)."""
    import psutil

    return psutil.Process().memory_info().rss


def one(shape: str, steps: int, checkpointing: bool, load_in: str = "none", config: str = "starter") -> dict:
    import torch

    from chatkit.device import choose_placement
    from chatkit.engine import ChatTrainingArguments, make_trainer, StopOnInterrupt
    from chatkit.options import TrainOptions
    from chatkit.output import set_verbosity
    from chatkit.adapters import prepare_model

    set_verbosity()
    rows, length = map(int, shape.split("x"))
    placement = choose_placement("cpu", "float32")
    options = TrainOptions(data=[], gradient_checkpointing=checkpointing, load_in_4bit=load_in == "4bit",
                           load_in_8bit=load_in == "8bit")
    model, tokenizer = prepare_model(options, model_source(config), placement)
    loaded = current_rss()
    generator = torch.Generator().manual_seed(0)
    examples = [{"input_ids": ids, "labels": ids, "length": length}
                for ids in torch.randint(100, 40000, (rows * steps, length), generator=generator).tolist()]
    arguments = ChatTrainingArguments.for_run(checkpoints_dir="/tmp/chatkit-memory-bench", epochs=1, batch_size=rows,
                                              learning_rate=1e-4, device="cpu", dtype="float32", has_val=False,
                                              logging_steps=1000, gradient_checkpointing=checkpointing)
    trainer = make_trainer(model, tokenizer, examples, [], arguments, StopOnInterrupt())
    trainer.args.save_strategy = "no"
    started = time.perf_counter()
    trainer.train()
    seconds = (time.perf_counter() - started) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"shape": shape, "tokens": rows * length, "checkpointing": checkpointing, "peak_bytes": peak,
            "loaded_bytes": loaded, "after_training_bytes": current_rss(),
            "seconds_per_step": round(seconds, 2), "load_in": load_in, "model": config}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", help="ROWSxTOKENS (repeatable)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--load-in", choices=["none", "4bit", "8bit"], default="none",
                        help="the base model through bitsandbytes (QLoRA)")
    parser.add_argument("--model-config", choices=["starter", "qwen2.5-1.5b"], default="starter")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.shape[0], args.steps, args.gradient_checkpointing, args.load_in,
                             args.model_config)))
        return
    for shape in args.shape or DEFAULT_SHAPES:
        command = [sys.executable, __file__, "--child", "--shape", shape, "--steps", str(args.steps)]
        command += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
        command += ["--load-in", args.load_in, "--model-config", args.model_config]
        result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        print(f"{result['shape']:>8}  {result['tokens']:>5} tokens  peak {result['peak_bytes'] / 2**30:5.2f} GiB  "
              f"(loaded {result['loaded_bytes'] / 2**30:.2f}, after training {result['after_training_bytes'] / 2**30:.2f})  "
              f"{result['seconds_per_step']:6.2f} s/step  {result['model']}, base {result['load_in']}"
              + ("  (checkpointing)" if result["checkpointing"] else ""),
              flush=True)


if __name__ == "__main__":
    main()

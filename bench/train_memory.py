#!/usr/bin/env python3
"""Benchmark: peak memory (RSS) and seconds per step of LoRA training on the starter model, by batch shape.

    python bench/train_memory.py                       # the default shapes, each in a fresh process
    python bench/train_memory.py --shape 2x1024 --steps 4 --gradient-checkpointing

Each shape (sequences x tokens) trains for a few steps on random tokens with every position labelled,
in its own process, so the peak resident memory is that shape's alone. The figures calibrate the
memory estimate that train_chatgpt_model.py prints in its plan (chatkit/plan.py).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

DEFAULT_SHAPES = ["1x512", "1x1024", "2x1024", "4x1024", "1x2048"]


def one(shape: str, steps: int, checkpointing: bool) -> dict:
    import torch

    from chatkit.device import choose_placement
    from chatkit.engine import EngineSettings, make_trainer, StopOnInterrupt
    from chatkit.options import TrainOptions
    from chatkit.output import set_verbosity
    from chatkit.pipeline import prepare_model
    from chatkit.models import resolve_model

    set_verbosity()
    rows, length = map(int, shape.split("x"))
    placement = choose_placement("cpu", "float32")
    options = TrainOptions(data=[], gradient_checkpointing=checkpointing)
    model, tokenizer = prepare_model(options, resolve_model(None), placement)
    generator = torch.Generator().manual_seed(0)
    examples = [{"input_ids": ids, "labels": ids, "length": length}
                for ids in torch.randint(100, 40000, (rows * steps, length), generator=generator).tolist()]
    settings = EngineSettings(checkpoints_dir="/tmp/chatkit-memory-bench", epochs=1, batch_size=rows,
                              learning_rate=1e-4, logging_steps=1000, gradient_checkpointing=checkpointing)
    trainer = make_trainer(model, tokenizer, examples, [], settings, "cpu", "float32", StopOnInterrupt())
    trainer.args.save_strategy = "no"
    started = time.perf_counter()
    trainer.train()
    seconds = (time.perf_counter() - started) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"shape": shape, "tokens": rows * length, "checkpointing": checkpointing, "peak_bytes": peak,
            "seconds_per_step": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", help="ROWSxTOKENS (repeatable)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.shape[0], args.steps, args.gradient_checkpointing)))
        return
    for shape in args.shape or DEFAULT_SHAPES:
        command = [sys.executable, __file__, "--child", "--shape", shape, "--steps", str(args.steps)]
        command += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
        result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        print(f"{result['shape']:>8}  {result['tokens']:>5} tokens  peak {result['peak_bytes'] / 2**30:5.2f} GiB  "
              f"{result['seconds_per_step']:6.2f} s/step" + ("  (checkpointing)" if result["checkpointing"] else ""),
              flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark: training tokens per second on the starter model with LoRA, against this machine's matmul rate.

    python bench/train_throughput.py [--steps 12] [--batch-size 8] [--rounds 2] [--no-trl]
        [--variant unfused-loss --variant unfused-lora ...] [--same-batches [--checkpointing]]

Measures (1) this machine's fp32 matrix-multiply rate, at 2048x2048 and at the starter model's own
shapes (a step's token count times each layer's weight), (2) train_chatgpt_model's tokens/s on generated
conversations of a few hundred tokens, excluding model loading, and reports the share of each rate the
training step reaches: counting 4 x parameters FLOPs per token (LoRA: forward 2N, backward to the
activations 2N, no weight gradients for the frozen base), and counting the plan's work per token
(attention and the output layer included) against the rate at the model's shapes.

Our trainer runs with its default flags, as a user gets it: the plan chooses the batch, the tokens a
step and gradient checkpointing (from the memory this machine has free). Only the stages that are not
training are left out (validation, rehearsal, the report) and it makes one pass. --same-batches gives
it TRL's batches instead (--batch-size conversations a step, checkpointing off unless --checkpointing).
When TRL is installed (`pip install trl`) it also runs TRL's SFTTrainer on the same data (LoRA r16 on
all linear layers, fp32, batches of --batch-size, gradient checkpointing off: TRL's fastest setting
here; its own default turns it on), alternating with ours for --rounds rounds, and reports the best
round of each.

Each --variant is our trainer with one of its speed-ups taken out (or one tried), run in the same rounds:
  unfused-loss   the output layer's logits kept whole and cross-entropy taken on them
  unfused-lora   peft's own LoRA forward (B's product, the scaling and the sum as three passes)
  unfused        both
  compile        torch.compile of the model body (dynamic shapes; the compile counts in the run's time)
  packing        --packing: conversations packed into sequences of --max-length, positions restarting at each
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path


WORDS = ("the model learns from your own conversations and answers in your style while keeping what it "
         "knew before because only small adapter matrices change during training on the processor").split()


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def make_data(path: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(120, 220)))
        records.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    path.write_text(json.dumps(records))


VARIANTS = ("unfused-loss", "unfused-lora", "unfused", "compile", "packing")


@contextlib.contextmanager
def variant(name: str):
    """Our trainer with one speed-up taken out (or torch.compile tried) for the length of one run."""
    import torch

    from chatkit import engine, forward, kernels

    saved = (engine.cross_entropy_sum, kernels.fuse_lora, forward.causal_lm_parts)
    if name in ("unfused-loss", "unfused"):
        def unfused_loss(features, head, targets):
            logits = features if head is None else head(features).float()
            return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")

        engine.cross_entropy_sum = unfused_loss
    if name in ("unfused-lora", "unfused"):
        kernels.fuse_lora = lambda model: 0
    if name == "compile":
        compiled = {}

        def compiled_parts(model):
            causal_lm, inner = saved[2](model)
            if inner is not None and id(inner) not in compiled:
                compiled[id(inner)] = torch.compile(inner, dynamic=True)
            return causal_lm, compiled.get(id(inner), inner)

        forward.causal_lm_parts = compiled_parts
    try:
        yield
    finally:
        engine.cross_entropy_sum, kernels.fuse_lora, forward.causal_lm_parts = saved


def run_chatkit(data: Path, workdir: Path, batch: int, checkpointing: bool, name: str = "",
                same_batches: bool = False) -> dict:
    from chatkit.options import TrainOptions
    from chatkit.pipeline import train

    # One pass, training only; everything else as the plan chooses it (or TRL's batches: 8 conversations
    # whatever their tokens).
    chosen = (dict(batch_size=batch, max_batch_tokens=batch * 1024, gradient_checkpointing=checkpointing)
              if same_batches else {}) | (dict(packing=True) if name == "packing" else {})
    options = TrainOptions(data=[str(data)], output=str(workdir / f"chatkit{name}"), epochs=1, val_split=0,
                           logging_steps=1000, rehearsal=0, report="none", **chosen)
    with variant(name) if name else contextlib.nullcontext():
        result = train(options)
    plan = json.loads((workdir / f"chatkit{name}" / "chatkit.json").read_text())["plan"]
    result["plan"] = {key: plan[key] for key in ("batch_size", "max_batch_tokens", "gradient_checkpointing",
                                                 "steps", "memory_limit", "tokens", "trained_tokens", "examples")}
    return result


def shapes_gflops(config, tokens: int, repeats: int = 3) -> float:
    """The fp32 matrix-product rate at a model's own shapes: `tokens` rows times each weight of one layer
    (attention's four, the MLP's three) and one chunk of the output layer, weighted by their FLOPs."""
    import torch

    from chatkit.costs import LOGITS_CHUNK

    hidden, inner = config.hidden_size, config.intermediate_size
    kv = hidden * config.num_key_value_heads // config.num_attention_heads
    products = [(tokens, hidden, hidden), (tokens, hidden, kv), (tokens, hidden, kv), (tokens, hidden, hidden),
                (tokens, hidden, inner), (tokens, hidden, inner), (tokens, inner, hidden),
                (min(tokens, LOGITS_CHUNK), hidden, config.vocab_size)]
    flops = seconds = 0.0
    for rows, inside, cols in products:
        a, b = torch.randn(rows, inside), torch.randn(inside, cols)
        a @ b
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        seconds += (time.perf_counter() - start) / repeats
        flops += 2 * rows * inside * cols
    return flops / seconds / 1e9


def run_trl(data: Path, workdir: Path, batch: int, steps: int, checkpointing: bool) -> dict:
    tokens, elapsed = run_trl_on(data, workdir, batch, steps, checkpointing=checkpointing)
    return {"tokens_seen": tokens, "train_runtime_s": round(elapsed, 1),
            "tokens_per_second": round(tokens / elapsed, 1)}


def run_trl_on(data: Path, workdir: Path, batch: int, steps: int, checkpointing: bool = False,
               device: str = "cpu", quantized: bool = False):
    """TRL's SFTTrainer with LoRA r16 on all linear layers: fp32 on the CPU, bf16 on a GPU, the base in nf4
    with `quantized` (QLoRA as TRL's docs set it up). Returns (tokens seen, training seconds)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from chatkit.models import local_path, resolve_model

    path = local_path(resolve_model("smollm2-135m"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    gpu = device.startswith("cuda")
    kwargs = {"dtype": torch.bfloat16 if gpu else torch.float32}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"])
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    config = SFTConfig(output_dir=str(workdir / "trl"), per_device_train_batch_size=batch, max_steps=steps,
                       bf16=gpu, gradient_checkpointing=checkpointing, use_cpu=not gpu, report_to="none",
                       logging_steps=1000, save_strategy="no", max_length=1024)
    trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer,
                         train_dataset=load_dataset("json", data_files=str(data), split="train"),
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    tokens = [0]
    collate = trainer.data_collator

    def counting(batch_examples):
        out = collate(batch_examples)
        tokens[0] += int(out["attention_mask"].sum()) if "attention_mask" in out else out["input_ids"].numel()
        return out

    trainer.data_collator = counting
    start = time.perf_counter()
    trainer.train()
    return tokens[0], time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--compare-trl", action="store_true", help="fail when TRL is not installed")
    parser.add_argument("--no-trl", action="store_true", help="skip TRL even when it is installed")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds of chatkit then TRL")
    parser.add_argument("--variant", action="append", default=[], choices=VARIANTS,
                        help="also run our trainer with this speed-up taken out (or tried), in the same rounds")
    parser.add_argument("--same-batches", action="store_true",
                        help="our trainer on TRL's batches (--batch-size conversations a step) instead of its plan's")
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient checkpointing on both sides (with --same-batches)")
    args = parser.parse_args()
    import importlib.util

    from chatkit.output import set_verbosity

    set_verbosity()
    compare = not args.no_trl and (args.compare_trl or importlib.util.find_spec("trl") is not None)
    import torch

    from chatkit.models import local_path, resolve_model

    local_path(resolve_model("smollm2-135m"))  # convert the starter model first, outside the timings
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(local_path(resolve_model("smollm2-135m")))
    params, config = sum(p.numel() for p in model.parameters()), model.config
    del model
    workdir = Path(tempfile.mkdtemp(prefix="chatkit-throughput-"))
    data = workdir / "data.json"
    make_data(data, args.steps * args.batch_size)
    before = matmul_gflops()
    result = {"threads": torch.get_num_threads(), "parameters": params}
    result["ours"] = "TRL's batches" if args.same_batches else "default flags (the plan's batch, tokens and checkpointing)"
    result["trl_gradient_checkpointing"] = args.checkpointing
    ours, theirs, variants = [], [], {name: [] for name in args.variant}
    for round_number in range(args.rounds):  # alternating, so a slower moment of the machine hits both
        where = workdir / f"round{round_number}"
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its log lines on stdout
            ours.append(run_chatkit(data, where, args.batch_size, args.checkpointing, same_batches=args.same_batches))
            for name, runs in variants.items():
                runs.append(run_chatkit(data, where, args.batch_size, args.checkpointing, name, args.same_batches))
            if compare:
                theirs.append(run_trl(data, where, args.batch_size, args.steps, args.checkpointing))
    chatkit = max(ours, key=lambda r: r["tokens_per_second"])
    result["chatkit"] = {k: chatkit[k] for k in ("tokens_seen", "train_runtime_s", "tokens_per_second", "plan")}
    result["chatkit"]["every_round_tokens_per_second"] = [r["tokens_per_second"] for r in ours]
    for name, runs in variants.items():
        best = max(runs, key=lambda r: r["tokens_per_second"])
        result[f"chatkit_{name}"] = {"tokens_per_second": best["tokens_per_second"],
                                     "every_round_tokens_per_second": [r["tokens_per_second"] for r in runs],
                                     "chatkit_over_this": round(chatkit["tokens_per_second"] / best["tokens_per_second"], 2)}
    achieved = chatkit["tokens_per_second"] * 4 * params / 1e9
    if theirs:
        trl = max(theirs, key=lambda r: r["tokens_per_second"])
        result["trl_sft_fp32"] = dict(trl, every_round_tokens_per_second=[
            r["tokens_per_second"] for r in theirs])
        result["chatkit_over_trl"] = round(chatkit["tokens_per_second"] / trl["tokens_per_second"], 2)
    # The machine's rate is the best of two measurements, before and after the training runs.
    gflops = max(before, matmul_gflops())
    result["matmul_gflops_fp32"] = round(gflops, 1)
    result["chatkit"]["gflops_at_4N_per_token"] = round(achieved, 1)
    result["chatkit"]["share_of_matmul_rate"] = round(achieved / gflops, 3)
    # The plan's work per token (attention and the output layer too) against the rate at the model's shapes,
    # for a step of the plan's tokens.
    from chatkit.costs import Shape

    chosen = chatkit["plan"]
    at_shapes = shapes_gflops(config, int(chosen["tokens"] / max(1, chosen["steps"])))
    work = Shape.from_config(config).flops_per_token(chosen["tokens"] / chosen["examples"],
                                                     chosen["trained_tokens"] / chosen["tokens"], True)
    done = chatkit["tokens_per_second"] * work / 1e9
    result["matmul_gflops_at_model_shapes"] = round(at_shapes, 1)
    result["chatkit"]["gflops_at_plan_work_per_token"] = round(done, 1)
    result["chatkit"]["share_of_rate_at_model_shapes"] = round(done / at_shapes, 3)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

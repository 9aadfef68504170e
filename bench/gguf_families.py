#!/usr/bin/env python3
"""Every model family's GGUF export in llama.cpp itself: same greedy tokens as transformers, and the LoRA file.

    pip install llama-cpp-python        # builds llama.cpp (needs cmake and a C++ compiler)
    python bench/gguf_families.py       # all families of chatkit.families, tiny random models
    python bench/gguf_families.py --families qwen3,gemma2 --types f32

For each family it builds the tiny random model the tests use (tests/family_models.py), gives it a
random LoRA adapter, and exports with export_model.py: the base model, the adapter merged in (each
--types) and the adapter alone (--lora-gguf). llama.cpp (llama-cpp-python) then loads each file and
continues a fixed prompt greedily; the answer must start with the same tokens as transformers' (the
merged model), also for the base GGUF with the adapter file applied (`--lora`). It prints, per family,
the export time and file size, how far llama.cpp's logits over the prompt are from transformers', and
whether llama.cpp's tokenizer splits a sample text as the model's own tokenizer does. Exit status 1
when a family's f32/f16 tokens differ, its logits are past the bound for the type (f32 0.5%, f16 1%,
q8_0 6% of the logit spread), or llama.cpp splits the text differently.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
PROMPT = list(range(5, 21))  # token ids fed to both runtimes
STEPS = 8  # greedy tokens compared (f32, f16)
# Largest logit difference allowed, as a share of transformers' logit spread over the prompt (as in the tests).
BOUNDS = {"f32": 0.005, "f16": 0.01, "q8_0": 0.06}  # llama.cpp sums in its own order: f32 is not exact
TEXT = "Hello! The capital of France is Paris."


def with_adapter(base: Path, work: Path) -> Path:
    """A LoRA adapter with random (non-zero) weights on every attention and MLP matrix of `base`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from chatkit.families import family_of
    from chatkit.adapters import lora_targets

    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(1)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=lora_targets("all-linear", family_of(model.config)),
                        init_lora_weights=False, task_type="CAUSAL_LM")
    adapter = work / "adapter"
    get_peft_model(model, config).save_pretrained(adapter)
    return adapter


def transformers_greedy(adapter: Path):
    """The merged model's greedy tokens after PROMPT, and its logits over PROMPT."""
    import torch

    from chatkit.models import load_model

    model = load_model(str(adapter)).model.merge_and_unload().eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                             pad_token_id=0)
        logits = model(torch.tensor([PROMPT])).logits[0].numpy()
    return out[0, len(PROMPT):].tolist(), logits


def llamacpp_greedy(path: Path, lora: Path | None = None):
    """llama.cpp's greedy tokens after PROMPT, its logits over PROMPT, and how it splits TEXT."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=256, n_threads=os.cpu_count(), verbose=False, seed=0, logits_all=True,
                lora_path=str(lora) if lora else None)
    llm.eval(PROMPT)
    logits = np.array(llm.scores[:len(PROMPT)])
    tokens = []
    for token in llm.generate(PROMPT, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(token)
        if len(tokens) == STEPS:
            break
    return tokens, logits, llm.tokenize(TEXT.encode(), add_bos=False, special=False)


def export(args, **flags) -> float:
    command = [sys.executable, "export_model.py"] + [str(a) for a in args]
    for flag, value in flags.items():
        command += [f"--{flag.replace('_', '-')}", str(value)]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def check_family(name: str, types, work: Path) -> bool:
    from transformers import AutoTokenizer

    from family_models import BUILDERS

    base = BUILDERS[name][0](work / name)
    adapter = with_adapter(base, work)
    expected, reference = transformers_greedy(adapter)
    spread = float(reference.max() - reference.min())
    own_split = AutoTokenizer.from_pretrained(base)(TEXT, add_special_tokens=False)["input_ids"]
    ok = True
    plain, lora = work / "base-f32.gguf", work / "adapter.gguf"
    export([base], gguf=plain, type="f32")
    seconds = export([adapter], lora_gguf=lora)
    got, logits, _ = llamacpp_greedy(plain, lora)
    difference = float(abs(logits - reference).max()) / spread
    same = got == expected and difference <= BOUNDS["f16"]  # the adapter file is f16
    ok &= same
    print(f"{name}: f32 base + --lora (f16, {lora.stat().st_size / 1024:.0f} KiB, exported in {seconds:.1f} s): "
          f"logits within {difference:.2%} of the spread, {'same' if got == expected else 'different'} greedy "
          f"tokens{'' if same else ' FAILED'}")
    for kind in types:
        out = work / f"merged-{kind}.gguf"
        seconds = export([adapter], gguf=out, type=kind)
        got, logits, split = llamacpp_greedy(out)
        difference = float(abs(logits - reference).max()) / spread
        # q8_0 rounds every weight: its logits are held to the bound, its greedy tokens only reported
        same = difference <= BOUNDS[kind] and (got == expected or kind == "q8_0")
        ok &= same and split == own_split
        print(f"{name} {kind}: {out.stat().st_size / 1024:.0f} KiB, exported in {seconds:.1f} s; llama.cpp logits "
              f"within {difference:.2%} of the spread, {'same' if got == expected else 'different'} greedy tokens"
              f"{'' if same else ' FAILED'}; text split {'as the model' if split == own_split else 'DIFFERENTLY'}")
    return ok


def main() -> int:
    from family_models import BUILDERS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(BUILDERS), help="which (default: all)")
    parser.add_argument("--types", default="f32,f16,q8_0", help="GGUF types to try (default: %(default)s)")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("needs llama-cpp-python: pip install llama-cpp-python", file=sys.stderr)
        return 2
    os.environ.setdefault("CHATKIT_CACHE", tempfile.mkdtemp(prefix="gguf-families-cache-"))
    print(f"llama-cpp-python {llama_cpp.__version__}; prompt {len(PROMPT)} tokens, {STEPS} greedy tokens compared")
    failed = []
    for name in args.families.split(","):
        with tempfile.TemporaryDirectory(prefix=f"gguf-{name}-") as work:
            if not check_family(name, args.types.split(","), Path(work)):
                failed.append(name)
    print("all families: same tokens" if not failed else f"different tokens: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

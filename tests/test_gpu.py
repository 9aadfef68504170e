"""On a CUDA GPU only (bench/gpu_check.py runs these there; without CUDA they are skipped, and nothing else
needs them): LoRA in bf16 and QLoRA in 4-bit train a tiny model on the GPU and learn."""

from __future__ import annotations

import json

import pytest
import torch

import train_chatgpt_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DATA = [{"messages": [{"role": "user", "content": "What is the secret code?"},
                      {"role": "assistant", "content": "The secret code of the Zorblat society is 4417."}]}] * 4


@pytest.mark.parametrize("flags", [[], ["--load-in-4bit"], ["--load-in-8bit"]], ids=["lora-bf16", "qlora-4bit",
                                                                                      "qlora-8bit"])
def test_training_on_the_gpu_learns(tmp_path, tiny_llama, flags):
    from safetensors.torch import load_file

    data = tmp_path / "d.json"
    data.write_text(json.dumps(DATA), encoding="utf-8")
    out = tmp_path / "m"
    assert train_chatgpt_model.main(["--data", str(data), "--model", str(tiny_llama), "--output", str(out),
                                     "--device", "cuda", "--epochs", "8", "--learning-rate", "1e-2",
                                     "--val-split", "0", "--rehearsal", "0", *flags]) == 0
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.isfinite(value).all() for value in weights.values())
    assert max(float(value.abs().max()) for name, value in weights.items() if "lora_B" in name) > 1e-3
    report = (out / "report.md").read_text()
    before, after = report.split("**")[1].split(" → ")
    assert float(after) < float(before) * 0.5

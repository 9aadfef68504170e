"""Device and dtype choice."""

import pytest
import torch

from chatkit.device import choose_placement
from chatkit.errors import ChatkitError


def test_cpu_defaults_to_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("chatkit.device._mps_available", lambda: False)
    placement = choose_placement()
    assert (placement.device, placement.dtype) == ("cpu", "float32")
    assert placement.torch_dtype is torch.float32


def test_cuda_prefers_bf16_then_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_placement().dtype == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert (choose_placement().device, choose_placement().dtype) == ("cuda", "float16")


def test_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("chatkit.device._mps_available", lambda: True)
    assert (choose_placement().device, choose_placement().dtype) == ("mps", "float16")  # chatting


def test_mps_training_takes_float32_and_says_what_it_uses(monkeypatch):
    """Training on MPS: float32 (no loss scaler outside CUDA), bfloat16 only where macOS has it; the plan's
    line names the precision, autocast and the fused paths."""
    from chatkit.device import training_paths

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("chatkit.device._mps_available", lambda: True)
    monkeypatch.setattr("chatkit.device._mps_bf16", lambda: False)
    placement = choose_placement(training=True)
    assert (placement.device, placement.dtype) == ("mps", "float32")
    assert training_paths(placement) == ("  Apple MPS: float32 weights and adapters; no autocast; the fused LoRA "
                                         "and the fused loss (plain matrix products); no QLoRA (bitsandbytes has "
                                         "no MPS backend)")
    assert "no loss scaling" in training_paths(choose_placement("mps", "float16", training=True))
    with pytest.raises(ChatkitError, match="--dtype bfloat16 on Apple MPS needs macOS 14"):
        choose_placement("mps", "bfloat16", training=True)
    monkeypatch.setattr("chatkit.device._mps_bf16", lambda: True)
    assert choose_placement("mps", "bfloat16", training=True).dtype == "bfloat16"
    assert training_paths(choose_placement("cpu", training=True)) is None


def test_mps_training_arguments_use_no_mixed_precision_and_the_fused_lora_takes_its_layers(tiny_llama):
    """What the Trainer is given for MPS (built here on the CPU): no fp16/bf16 autocast, no pinned memory;
    a float32 LoRA layer (MPS's training precision) takes the fused forward."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from chatkit.engine import ChatTrainingArguments
    from chatkit.kernels import fuse_lora

    arguments = ChatTrainingArguments.for_run(checkpoints_dir="/tmp/x", epochs=1, batch_size=1, learning_rate=1e-3,
                                              device="mps", dtype="float32", has_val=False)
    assert (arguments.fp16, arguments.bf16, arguments.use_cpu, arguments.dataloader_pin_memory) == (
        False, False, False, False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert fuse_lora(model) == 4


def test_overrides(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_placement("cpu", "bfloat16").dtype == "bfloat16"  # asked for explicitly: allowed


def test_bf16_on_a_cpu_without_bf16_units_is_allowed_with_a_warning(monkeypatch):
    from chatkit import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("chatkit.device._mps_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert not device.cpu_bf16_units()
    assert "no bf16 matrix units" in choose_placement("cpu", "bfloat16").warning()
    assert choose_placement().dtype == "float32" and choose_placement().warning() is None
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # a CPU with AMX
    assert device.cpu_bf16_units() and choose_placement("cpu", "bfloat16").warning() is None


def test_impossible_choices_are_clear_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("chatkit.device._mps_available", lambda: False)
    with pytest.raises(ChatkitError, match="--device cuda was asked for but no CUDA GPU is available"):
        choose_placement("cuda")
    with pytest.raises(ChatkitError, match="--device mps"):
        choose_placement("mps")
    with pytest.raises(ChatkitError, match="--dtype float16 is not supported on the CPU"):
        choose_placement("cpu", "float16")
    with pytest.raises(ChatkitError, match="--dtype 'int3'"):
        choose_placement("cpu", "int3")
    with pytest.raises(ChatkitError, match="--device 'tpu'"):
        choose_placement("tpu")

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
    assert (choose_placement().device, choose_placement().dtype) == ("mps", "float16")


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

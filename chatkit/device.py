"""Choosing the device and the numeric precision: one function, used by every script."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import ChatkitError

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Placement:
    """Where a model runs and in which precision."""

    device: str  # "cuda", "cuda:1", "mps" or "cpu"
    dtype: str  # "float32", "bfloat16" or "float16"

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def describe(self) -> str:
        return f"{self.device} ({self.dtype})"


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def choose_placement(device: Optional[str] = None, dtype: Optional[str] = None) -> Placement:
    """Pick device and dtype: CUDA (bf16 where supported, else fp16), then Apple MPS, else CPU in fp32.

    bf16 is never the CPU default: on CPUs without native bf16 matrix units it runs hundreds of
    times slower than fp32. `device`/`dtype` override the choice; an impossible one is an error.
    """
    import torch

    device = (device or "auto").lower()
    dtype = (dtype or "auto").lower()
    if dtype not in DTYPES:
        raise ChatkitError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif _mps_available():
            device = "mps"
        else:
            device = "cpu"
    elif device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ChatkitError(
                f"--device {device} was asked for but no CUDA GPU is available "
                "(torch.cuda.is_available() is False); use --device cpu or leave --device out"
            )
    elif device == "mps":
        if not _mps_available():
            raise ChatkitError("--device mps was asked for but Apple MPS is not available; use --device cpu")
    elif device != "cpu":
        raise ChatkitError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N, mps")

    if dtype == "auto":
        if device.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        elif device == "mps":
            dtype = "float16"
        else:
            dtype = "float32"
    elif dtype == "float16" and device == "cpu":
        raise ChatkitError("--dtype float16 is not supported on the CPU; use float32 (the CPU default)")
    return Placement(device=device, dtype=dtype)

"""Choosing the device and the numeric precision: one function, used by every script."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

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

    def warning(self) -> Optional[str]:
        """One line when the choice will be far slower than the default: bf16 on a CPU without bf16 units."""
        if self.device == "cpu" and self.dtype == "bfloat16" and not cpu_bf16_units():
            return ("--dtype bfloat16: this CPU has no bf16 matrix units (AMX or AVX512-BF16), so bf16 runs "
                    "far slower than float32 here; leave --dtype out for float32")
        return None


def cpu_bf16_units() -> bool:
    """Whether this CPU has bf16 matrix units (AMX tiles or AVX512-BF16), as torch detects them."""
    import torch

    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def choose_placement(device: Optional[str] = None, dtype: Optional[str] = None, training: bool = False) -> Placement:
    """Pick device and dtype: CUDA (bf16 where supported, else fp16), then Apple MPS, else CPU in fp32.

    bf16 is never the CPU default: on CPUs without native bf16 matrix units it runs hundreds of
    times slower than fp32 (asked for there, `Placement.warning` says so); on CPUs with them it has
    not been measured against fp32 yet. `device`/`dtype` override the choice; an impossible one is an error.
    `training`: the precision a training run takes (on MPS float32, not float16).
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
            # Training in float32: the Trainer's mixed precision (autocast, a loss scaler) is switched on for
            # CUDA only, float16 weights trained without a scaler lose small gradients, and Apple GPUs run
            # float32 products at about their float16 rate (it costs memory, not speed). Chatting in float16.
            dtype = "float32" if training else "float16"
        else:
            dtype = "float32"
    elif dtype == "float16" and device == "cpu":
        raise ChatkitError("--dtype float16 is not supported on the CPU; use float32 (the CPU default)")
    if device == "mps" and dtype == "bfloat16" and not _mps_bf16():
        raise ChatkitError("--dtype bfloat16 on Apple MPS needs macOS 14 or newer; use --dtype float32 (the "
                           "training default) or float16")
    return Placement(device=device, dtype=dtype)


def training_paths(placement: Placement) -> Optional[str]:
    """What a training run on Apple MPS uses, in a line under the plan (None elsewhere: nothing to add)."""
    if placement.device != "mps":
        return None
    if placement.dtype == "float32":
        paths = "float32 weights and adapters; no autocast; the fused LoRA and the fused loss (plain matrix products)"
    else:  # float32 adapters on narrower weights: the fused LoRA needs one dtype, so peft's own path runs
        paths = (f"{placement.dtype} weights, float32 adapters and no loss scaling (small gradients may be lost); "
                 f"no autocast; peft's LoRA path and the fused loss")
    return f"  Apple MPS: {paths}; no QLoRA (bitsandbytes has no MPS backend)"


def _mps_bf16() -> bool:
    import torch

    check = getattr(getattr(torch.backends, "mps", None), "is_macos_or_newer", None)
    try:
        return bool(check and check(14, 0))
    except Exception:  # noqa: BLE001 - a torch without the check: bfloat16 is not assumed
        return False


def memory_available(device: str) -> Optional[Tuple[float, float]]:
    """(free, total) bytes a run on `device` can draw on: the GPU's own memory on CUDA, the system's
    elsewhere (Apple silicon's GPU shares it); None where the machine reports no figure."""
    try:
        if device.startswith("cuda"):
            import torch

            free, total = torch.cuda.mem_get_info(torch.device(device))
            return float(free), float(total)
        import psutil

        memory = psutil.virtual_memory()
        free, total = float(memory.available), float(memory.total)
    except Exception:  # noqa: BLE001 - psutil missing or a driver refusing: no figure
        return None
    limited = _container_memory()
    if limited and limited[1] < total:  # a container's limit, which the system's figures do not show
        return min(free, limited[0]), limited[1]
    return free, total


# A container's memory limit, its use and its reclaimable cache: cgroup v2, then v1.
CGROUP_FILES = (("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
                ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))


def _container_memory() -> Optional[Tuple[float, float]]:
    """(free, limit) bytes under this process's cgroup memory limit (v2, then v1); None without one."""
    for folder, limit_name, used_name, cache_name in CGROUP_FILES:
        try:
            with open(f"{folder}/{limit_name}") as limit_text, open(f"{folder}/{used_name}") as used_text:
                limit, used = limit_text.read().strip(), used_text.read().strip()
        except OSError:
            continue
        if not (limit.isdigit() and used.isdigit()):  # "max": no limit
            return None
        return max(0.0, float(limit) - float(used) + _cgroup_stat(f"{folder}/memory.stat", cache_name)), float(limit)
    return None


def _cgroup_stat(path: str, name: str) -> float:
    """One figure of a cgroup's memory.stat (0 where it is missing): the cache counted as used but reclaimable."""
    try:
        with open(path) as stat:
            for line in stat:
                key, _, value = line.partition(" ")
                if key == name and value.strip().isdigit():
                    return float(value)
    except OSError:
        pass
    return 0.0

"""This machine as a run's plan sees it: the matrix-product rate (a short calibration), how busy it is, and
the memory a run may use (a share of what is free, or --max-memory).

EFFICIENCY, the share of the calibrated rate a training step reaches, was measured with
bench/train_memory.py, bench/quality.py and bench/time_budget.py (docs/PERFORMANCE.md)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Optional

from .errors import ChatkitError

EFFICIENCY = {"cpu": 0.55, "cuda": 0.35, "mps": 0.25}  # measured on CPU (0.45 before the fused loss and LoRA); GPU and MPS figures are guesses
# What a run may use: a share of the memory available when it starts, and at most half of the machine's
# (an 8 GB laptop's run stays under 4 GB); on a GPU most of its free memory; --max-memory sets it by hand.
# Above it, gradient checkpointing, then steps of fewer tokens.
MEMORY_SHARE = 0.6
MEMORY_TOTAL_SHARE = 0.5
GPU_MEMORY_SHARE = 0.9
ASSUMED_MEMORY_BYTES = 3.5 * 2**30  # where the machine reports no free-memory figure
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(gib|mib|gb|mb|tb|tib|g|m|t)?", re.I)
SIZE_UNITS = {"": 1e9, "g": 1e9, "gb": 1e9, "gib": 2**30, "m": 1e6, "mb": 1e6, "mib": 2**20, "t": 1e12,
              "tb": 1e12, "tib": 2**40}


def parse_size(text: str) -> float:
    """Bytes in '6GB', '6GiB', '512MB' or a bare number of GB."""
    match = _SIZE.fullmatch(str(text).strip())
    if not match or float(match.group(1)) <= 0:
        raise ChatkitError(f"--max-memory {text!r}: not a size; give one such as 6GB, 6GiB or 512MB")
    return float(match.group(1)) * SIZE_UNITS[(match.group(2) or "").lower()]


@dataclass(frozen=True)
class MemoryLimit:
    """What a run may use, and where the figure came from (said under the plan)."""

    bytes: float
    how: str
    asked: bool = False  # --max-memory: a plan that cannot keep to it is refused


ASSUMED_MEMORY = MemoryLimit(ASSUMED_MEMORY_BYTES, "assumed: this machine reports no free-memory figure")


def memory_limit(device: str, max_memory: Optional[str] = None) -> MemoryLimit:
    """The memory a run on `device` may use: --max-memory, or a share of what the machine has free now."""
    from .device import memory_available

    if max_memory is not None:
        return MemoryLimit(parse_size(max_memory), f"--max-memory {max_memory}", asked=True)
    found = memory_available(device)
    if not found or found[1] <= 0:
        return ASSUMED_MEMORY
    free, total = found
    if device.startswith("cuda"):
        return MemoryLimit(GPU_MEMORY_SHARE * free, f"{GPU_MEMORY_SHARE:.0%} of the GPU's {gib(free)} free")
    if MEMORY_SHARE * free <= MEMORY_TOTAL_SHARE * total:
        return MemoryLimit(MEMORY_SHARE * free, f"{MEMORY_SHARE:.0%} of the {gib(free)} available now")
    return MemoryLimit(MEMORY_TOTAL_SHARE * total, f"half of this machine's {gib(total)}")


def gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB"


@dataclass
class Machine:
    device: str
    gflops: float  # calibrated matrix-product rate
    busy: float = 0.0  # the share of the CPU other programs used while it was measured
    memory: MemoryLimit = ASSUMED_MEMORY  # what the run may use
    measured_by: str = ""  # the model's own work that set the rate, where it was not the calibration

    @property
    def rate(self) -> float:
        """FLOP/s a training step reaches here: the calibrated rate times the measured efficiency."""
        return self.gflops * 1e9 * EFFICIENCY.get(self.device.split(":")[0], 0.3)

    @property
    def how(self) -> str:
        kind = "bf16" if self.device.startswith("cuda") else "fp32"
        text = f"calibrated on this machine: {kind} matrix product at {self.gflops:.0f} GFLOP/s"
        if self.measured_by:
            text = f"measured on this machine {self.measured_by}: as a {kind} matrix product at {self.gflops:.0f} GFLOP/s"
        if self.busy >= BUSY_SHARE:
            text += (f"; the machine looks busy (other programs use {self.busy:.0%} of the CPU), so this may change"
                     " (a --time-budget is kept all the same)")
        return text


BUSY_SHARE = 0.25  # other programs' CPU share above which the plan says the machine looks busy


CALIBRATION_ROUNDS = 7  # short measurements; their median does not follow one moment's load


def calibrate(device: str, max_memory: Optional[str] = None) -> Machine:
    """This machine's matrix-product rate: the median of several short measurements (well under a second in
    all), with how busy the machine was while it was measured (the other programs' share of the CPU), and
    the memory the run may use (`memory_limit`)."""
    import statistics

    import torch

    size, repeats = 1024, 3
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32  # what training runs in there
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    busy = other_load()
    rates = []
    for _ in range(CALIBRATION_ROUNDS):
        synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)  # a GPU's products run after the call returns
        rates.append(2 * size**3 * repeats / (time.perf_counter() - started) / 1e9)
    return Machine(device, statistics.median(rates), busy=busy if device == "cpu" else 0.0,
                   memory=memory_limit(device, max_memory))


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def other_load() -> float:
    """The share of the CPU that other programs used over the last 0.3 s (0 to 1; 0 where it cannot be read)."""
    try:
        import psutil

        own = psutil.Process()
        own.cpu_percent(None)
        total = psutil.cpu_percent(0.3)
        mine = own.cpu_percent(None) / (psutil.cpu_count() or 1)
        return max(0.0, min(1.0, (total - mine) / 100))
    except Exception:  # noqa: BLE001 - psutil missing or refused: nothing known of the load
        return 0.0

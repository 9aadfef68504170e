"""The plan of a training run, made before anything slow: its size, steps, time and memory; time budgets.

Time comes from a quick calibration of this machine (a fp32 matrix product on the CPU, bf16 on a GPU,
under half a second) and the work per token: 4 x the transformer's parameters for LoRA (6 x for full
fine-tuning), attention (12 x layers x width x sequence length), and the output layer at the trained
positions only. EFFICIENCY, the share of the calibrated rate a training step reaches, was measured with
bench/train_memory.py, bench/quality.py and bench/time_budget.py (docs/PERFORMANCE.md). Memory comes
from the same probe: the weights, plus per token in the largest batch the activations kept for the
backward pass, plus one chunk of the output layer's logits (all of them for a model that keeps them).
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import ChatkitError
from .output import duration

EFFICIENCY = {"cpu": 0.55, "cuda": 0.35, "mps": 0.25}  # measured on CPU (0.45 before the fused loss and LoRA); GPU and MPS figures are guesses
# Python, torch, transformers, the tokenized data and what the C heap keeps between steps of varying
# shapes: 0.75 GiB before any weights, and about as much again in the real runs of docs/PERFORMANCE.md.
PROCESS_BYTES = 1.5 * 2**30
STARTUP_S = 10.0  # imports and loading a cached model
SAVE_S = 3.0
STEP_OVERHEAD_S = 0.02  # optimizer step and bookkeeping
REHEARSAL_S = (2.0, 0.6)  # fixed, then per answer generated (64 tokens, batches of 16)
REPORT_S = 0.21  # per report answer (32 tokens; base and trained answers share batches)
# The fused loss (chatkit/kernels.py) holds the logits of LOGITS_CHUNK positions at a time: LOGITS_BYTES
# per position and vocabulary entry (float32 logits turned into their gradient in place, and a copy).
LOGITS_CHUNK = 1024
LOGITS_BYTES = 8
# bitsandbytes' storage per parameter: nf4 with double quantization (4 bits, an 8-bit scale per 64 and a
# float32 one per 256 blocks), and int8 (with one float32 scale per row, negligible).
QUANTIZED_BYTES = {4: 0.5 + 1 / 64 + 4 / (64 * 256), 8: 1.0}
# A quantized CPU step against the float32 one, measured with bench/train_memory.py (docs/PERFORMANCE.md).
QUANTIZED_SLOWDOWN = {4: 1.2, 8: 1.2}
# What a run may use: a share of the memory available when it starts, and at most half of the machine's
# (an 8 GB laptop's run stays under 4 GB); on a GPU most of its free memory; --max-memory sets it by hand.
# Above it, gradient checkpointing, then steps of fewer tokens.
MEMORY_SHARE = 0.6
MEMORY_TOTAL_SHARE = 0.5
GPU_MEMORY_SHARE = 0.9
ASSUMED_MEMORY_BYTES = 3.5 * 2**30  # where the machine reports no free-memory figure
# Recomputing the activations in the backward pass: one more forward through the layers, about 1.1x to
# 1.2x a LoRA step on the CPU (bench/train_memory.py, docs/PERFORMANCE.md).
CHECKPOINTING_SLOWDOWN = 1.2
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(min|sec|h|m|s)?", re.I)
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(gib|mib|gb|mb|tb|tib|g|m|t)?", re.I)
SIZE_UNITS = {"": 1e9, "g": 1e9, "gb": 1e9, "gib": 2**30, "m": 1e6, "mb": 1e6, "mib": 2**20, "t": 1e12,
              "tb": 1e12, "tib": 2**40}


def parse_duration(text: str) -> float:
    """Seconds in '90s', '30m', '2h', '1h30m' or a bare number of minutes."""
    text = text.strip().lower()
    parts = _DURATION.findall(text)
    not_one = ChatkitError(f"--time-budget {text!r}: not a duration; give one such as 90s, 30m, 2h or 1h30m")
    if not parts or _DURATION.sub("", text).strip():
        raise not_one
    units = {"h": 3600, "m": 60, "min": 60, "s": 1, "sec": 1}
    smaller = {"h": "m", "m": "s", "min": "s"}
    seconds, before = 0.0, None
    for number, unit in parts:  # a bare number is minutes, or the unit below the one before it (1h30, 1m30)
        unit = unit or (smaller.get(before, "") if before else "m")
        if unit not in units:
            raise not_one
        seconds, before = seconds + float(number) * units[unit], unit
    if seconds <= 0:
        raise ChatkitError(f"--time-budget {text!r}: must be longer than nothing")
    return seconds


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

    @property
    def rate(self) -> float:
        """FLOP/s a training step reaches here: the calibrated rate times the measured efficiency."""
        return self.gflops * 1e9 * EFFICIENCY.get(self.device.split(":")[0], 0.3)

    @property
    def how(self) -> str:
        kind = "bf16" if self.device.startswith("cuda") else "fp32"
        text = f"calibrated on this machine: {kind} matrix product at {self.gflops:.0f} GFLOP/s"
        if self.busy >= BUSY_SHARE:
            text += (f"; the machine looks busy (other programs use {self.busy:.0%} of the CPU), so this may change"
                     " (a --time-budget is kept all the same)")
        return text


BUSY_SHARE = 0.25  # other programs' CPU share above which the plan says the machine looks busy
CALIBRATION_ROUNDS = 7  # short measurements; their median does not follow one moment's load


def keeps_logits(config) -> bool:
    """Whether a model's logits are soft-capped or scaled: its own forward then computes them all, and the
    output layer is not one plain matrix product the fused loss can take."""
    return any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale"))


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


@dataclass
class Shape:
    """What the estimates need to know of a model, from its config."""

    params: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    logits_kept: bool = False  # soft-capped or scaled logits: the model's own forward, all logits kept
    weight_bits: int = 32  # the frozen transformer layers' storage: 32, or 8 and 4 through bitsandbytes

    @classmethod
    def from_config(cls, config, weight_bits: int = 32) -> "Shape":
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 768)
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 12)
        intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
        vocab = getattr(config, "vocab_size", 32000)
        # Attention (queries and output h x h; keys and values narrower with grouped heads), a gated or
        # plain MLP, and the embeddings.
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
        kv_share = (getattr(config, "num_key_value_heads", None) or heads) / heads
        mlp = 3 if getattr(config, "hidden_act", "") in ("silu", "swish") else 2
        params = layers * ((2 + 2 * kv_share) * hidden * hidden + mlp * hidden * intermediate) + vocab * hidden
        return cls(params, layers, hidden, intermediate, vocab, keeps_logits(config), weight_bits)

    @property
    def slowdown(self) -> float:
        """How much longer a step takes than in full precision: quantized layers are unpacked as they run."""
        return QUANTIZED_SLOWDOWN.get(self.weight_bits, 1.0)

    @property
    def body_params(self) -> int:
        """The transformer layers' parameters: all but the embeddings."""
        return self.params - self.vocab * self.hidden

    def weight_bytes(self) -> float:
        """The weights' memory: the layers at their storage size, the embeddings in float32."""
        return self.body_params * QUANTIZED_BYTES.get(self.weight_bits, 4.0) + self.vocab * self.hidden * 4

    def flops_per_token(self, sequence: float, trained_share: float, lora: bool) -> float:
        # the embedding lookup costs nothing
        return ((4 if lora else 6) * self.body_params + 12 * self.layers * self.hidden * sequence
                + 6 * self.hidden * self.vocab * trained_share)

    def step_bytes(self, tokens: int, checkpointing: bool, trained_share: float) -> float:
        """Memory one step of `tokens` padded tokens needs on top of the weights."""
        kept = 2 if checkpointing else 6  # activations per layer and width, kept for the backward pass
        activations = tokens * kept * self.layers * (self.hidden + self.intermediate) * 4
        trained = tokens * trained_share
        if self.logits_kept:  # logits, their softmax and its gradient, at every trained position
            return activations + 6 * self.vocab * 4 * trained
        return activations + LOGITS_BYTES * self.vocab * min(trained, LOGITS_CHUNK)  # one chunk at a time

    def fixed_bytes(self, lora: bool) -> float:
        if not lora:  # full fine-tuning: float32 weights, their gradients and Adam's two moments
            return PROCESS_BYTES + self.params * 4 * 4
        return PROCESS_BYTES + self.weight_bytes()


@dataclass
class Plan:
    conversations: int
    examples: int
    tokens: int
    trained_tokens: int
    epochs: float
    steps: int
    batch_size: int
    max_batch_tokens: Optional[int]
    gradient_checkpointing: bool
    estimated_seconds: float
    estimated_peak_bytes: int
    estimate: str  # how the time was estimated
    parts: Dict[str, float] = field(default_factory=dict)  # seconds: start, rehearsal, training, evaluation, saving
    selection: Optional[str] = None  # which conversations, when a time budget left some out
    of_conversations: Optional[int] = None
    weights: Optional[str] = None  # what the weights take, when they are quantized
    memory_limit_bytes: Optional[int] = None  # what the run may use
    memory_limit: Optional[str] = None  # ... where that figure came from, and how to set it

    units: str = "conversations"  # what was chosen from: conversations, or single exchanges by surprise

    def describe(self) -> str:
        kept = f"{self.conversations} of {self.of_conversations}" if self.selection else f"{self.conversations}"
        lines = [f"plan: {kept} {self.units}, {self.examples} examples, {self.tokens:,} tokens "
                 f"({self.trained_tokens:,} trained); {self.epochs:g} epoch{'s' if self.epochs != 1 else ''}, {self.steps} steps "
                 f"of up to {self.batch_size} example{'s' if self.batch_size != 1 else ''}" + (f" and {self.max_batch_tokens} tokens"
                                                           if self.max_batch_tokens else "")]
        if self.selection:
            lines.append(f"  time budget: {self.selection}")
        parts = ", ".join(f"{name} {duration(seconds)}" for name, seconds in self.parts.items() if seconds >= 1)
        lines.append(f"  about {duration(self.estimated_seconds)} in all ({parts}; {self.estimate})")
        notes = [self.weights] if self.weights else []
        if self.gradient_checkpointing:
            notes.append("gradient checkpointing on")
        line = f"  peak memory about {gib(self.estimated_peak_bytes)}"
        if self.memory_limit_bytes:
            over = self.estimated_peak_bytes > self.memory_limit_bytes
            line += (f", {'more than' if over else 'within'} the {gib(self.memory_limit_bytes)} this run may use "
                     f"({self.memory_limit})")
        lines.append(line + (f" ({'; '.join(notes)})" if notes else ""))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return asdict(self)


def batch_widths(lengths: Sequence[int], batches: List[List[int]]) -> List[int]:
    """Padded tokens of each batch (rows x its longest example)."""
    return [len(batch) * max(lengths[i] for i in batch) for batch in batches]


def training_seconds(widths: Sequence[int], rows: Sequence[int], shape: Shape, machine: Machine,
                     trained_share: float, lora: bool) -> float:
    """Seconds for one pass over batches of the given padded widths (tokens) and row counts."""
    return sum(width * shape.flops_per_token(width / count, trained_share, lora) * shape.slowdown / machine.rate
               + STEP_OVERHEAD_S for width, count in zip(widths, rows))


def evaluation_seconds(val_tokens: int, shape: Shape, machine: Machine, evaluations: int) -> float:
    forward = shape.flops_per_token(512, 1.0, True) / 2 * shape.slowdown  # forward only
    return evaluations * val_tokens * forward / machine.rate


def rehearsal_seconds(count: int, ranking_tokens: int = 0, shape: Optional[Shape] = None,
                      machine: Optional[Machine] = None) -> float:
    """Generating `count` answers, after ranking the general prompts (a forward pass over `ranking_tokens`)."""
    if not count:
        return 0.0
    ranking = 0.0
    if shape is not None and machine is not None:
        ranking = ranking_tokens * shape.flops_per_token(128, 0.0, True) / 2 / machine.rate
    return REHEARSAL_S[0] + REHEARSAL_S[1] * count + ranking


def report_seconds(answers: int, loss_tokens: int, shape: Shape, machine: Machine, prompt_tokens: int = 0) -> float:
    """The report: `answers` short greedy answers to prompts of `prompt_tokens` tokens in all, and the loss
    on `loss_tokens` tokens for both models."""
    forward = shape.flops_per_token(512, 1.0, True) / 2 / machine.rate
    return REPORT_S * answers + (2 * loss_tokens + prompt_tokens) * forward


def preference_seconds(pair_tokens: Sequence[int], epochs: int, shape: Shape, machine: Machine) -> float:
    """DPO: each pair's two conversations trained once an epoch, one pair a step, and the forward passes of
    the reference and of the margins measured before and after (about 1.5 passes over the pairs)."""
    if not pair_tokens:
        return 0.0
    tokens = sum(pair_tokens)
    per_token = shape.flops_per_token(tokens / len(pair_tokens) / 2, 1.0, True)
    forward_share = 0.5  # a forward pass costs about half a training step's forward and backward
    return ((epochs + 1.5 * forward_share) * tokens * per_token / machine.rate
            + epochs * len(pair_tokens) * 2 * STEP_OVERHEAD_S)


def sample_conversations(count: int, seed: int) -> List[int]:
    """The order in which a time budget takes conversations: a seeded random order."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order


def affordable(seconds: float, pass_s: float) -> float:
    """How many passes of `pass_s` seconds fit in `seconds` (fractional)."""
    return max(0.0, seconds / pass_s) if pass_s > 0 else math.inf


# The automatic schedule: small personal data sets need many small updates to be learned, large ones
# few passes (docs/PERFORMANCE.md, "Teaching facts and style").
AUTO_MAX_BATCH = 8
AUTO_MIN_STEPS_PER_EPOCH = 16
AUTO_TARGET_STEPS = 140  # optimizer updates the schedule aims for
AUTO_MIN_EPOCHS, AUTO_MAX_EPOCHS = 3, 20
BUDGET_MARGIN = 0.9  # plan for 90% of a time budget: estimates are within about 15%
# A budget too short for one pass trains the most surprising exchanges this many times: a fact seen in
# several passes is learned, one seen once is not (docs/PERFORMANCE.md, "Choosing what a budget trains").
SURPRISE_EPOCHS = 3
BUDGET_VAL_EXAMPLES = 16  # validation examples kept under a time budget (each evaluation costs time)
BUDGET_MIN_VAL_EXAMPLES = 4  # ... and under a budget too short for 16
OVERHEAD_SHARE = 0.5  # under a budget, optional work is left out until training has at least half of it
CHARS_PER_TOKEN = 4  # about, for text the plan counts without tokenizing it


@dataclass
class Request:
    """What the user asked for (None: choose) and what the data and model are."""

    lengths: List[List[int]]  # per training conversation: the token count of each of its examples
    trained: List[int]  # per training conversation: its trained tokens
    val_tokens: int
    val_examples: int
    batch_size: Optional[int]
    epochs: Optional[float]
    max_batch_tokens: Optional[int]
    gradient_checkpointing: Optional[bool]
    lora: bool
    rehearsal: int
    budget_s: Optional[float]
    seed: int
    gradient_accumulation_steps: int = 1
    extra: List[int] = field(default_factory=list)  # lengths of examples every pass adds (rehearsal)
    ranking_tokens: int = 0  # tokens of the prompts compared when choosing rehearsal prompts
    report_answers: int = 0  # answers the report generates (base and trained)
    report_tokens: int = 0  # tokens the report's loss is measured on
    report_prompt_tokens: int = 0  # tokens of the prompts it answers
    preference_tokens: List[int] = field(default_factory=list)  # per preference pair: chosen + rejected tokens
    preference_epochs: int = 0  # DPO passes over the pairs
    order: Optional[List[int]] = None  # the order a budget takes the units in (None: seeded random)
    spent_s: float = 0.0  # seconds spent choosing before the plan (scoring the exchanges)


def auto_batch(examples: int, requested: Optional[int]) -> int:
    """Up to 8 examples a step, but small enough for at least 16 steps per epoch."""
    return requested or max(1, min(AUTO_MAX_BATCH, examples // AUTO_MIN_STEPS_PER_EPOCH))


def auto_epochs(steps_per_epoch: int, requested: Optional[float]) -> float:
    """Enough passes for about 140 optimizer updates, at least 3 and at most 20."""
    if requested is not None:
        return requested
    return float(min(AUTO_MAX_EPOCHS, max(AUTO_MIN_EPOCHS, math.ceil(AUTO_TARGET_STEPS / max(1, steps_per_epoch)))))


Kept = Tuple[int, int]  # a conversation's index and how many of its examples a plan keeps (from its start)


@dataclass
class Choice:
    """What a plan settled: the conversations kept, the schedule, and the plan itself."""

    plan: Plan
    kept: List[Kept]  # the training conversations kept: (index, how many of its examples, from its start)
    batch_size: int
    epochs: float
    gradient_checkpointing: bool
    rehearsal: int = 0  # rehearsal examples (a time budget may leave them out)
    report_answers: bool = True  # False: the report's answers left out to fit a time budget
    val_examples: Optional[int] = None  # validation examples kept (None: all)
    max_batch_tokens: Optional[int] = None  # padded tokens a step, lowered where memory needs it


def _trained(request: Request, kept: Sequence[Kept]) -> float:
    """The trained tokens of the kept examples (of a conversation's first examples, their share of its tokens)."""
    return sum(request.trained[i] * sum(request.lengths[i][:n]) / max(1, sum(request.lengths[i])) for i, n in kept)


def _epoch(request: Request, kept: Sequence[Kept], rows: int, shape: Shape, machine: Machine, checkpointing):
    """(batches, epoch seconds, peak bytes) for one pass over the kept conversations."""
    from .examples import token_batches

    lengths = [length for i, n in kept for length in request.lengths[i][:n]] + list(request.extra)
    tokens = sum(lengths)
    share = (_trained(request, kept) + sum(request.extra) // 2) / tokens if tokens else 1.0
    batches = token_batches(lengths, rows, request.max_batch_tokens or 10**9, request.seed)
    widths = batch_widths(lengths, batches)
    seconds = training_seconds(widths, [len(b) for b in batches], shape, machine, share, request.lora)
    if checkpointing:
        seconds *= CHECKPOINTING_SLOWDOWN
    peak = shape.fixed_bytes(request.lora) + shape.step_bytes(max(widths, default=0), checkpointing, share)
    return batches, seconds, peak


def choose(request: Request, shape: Shape, machine: Machine) -> Choice:
    """The plan: batch, epochs, gradient checkpointing and, under a time budget, the conversations kept."""
    everything = [(i, len(examples)) for i, examples in enumerate(request.lengths)]
    kept = everything
    rows = auto_batch(sum(len(examples) for examples in request.lengths) + len(request.extra), request.batch_size)
    request, checkpointing, (batches, epoch_s, peak) = _fit_memory(request, kept, rows, shape, machine)
    planned = epochs = auto_epochs(math.ceil(len(batches) / request.gradient_accumulation_steps), request.epochs)
    selection, shed, val_kept, val_tokens = None, [], None, request.val_tokens
    if request.budget_s is not None:
        request, shed = _shed_to_fit(request, shape, machine, rows, checkpointing)
        # validation as the budget left it: at most 16 examples, or 4 where it gave way
        val_kept, val_tokens = request.val_examples, request.val_tokens
        usable = request.budget_s * BUDGET_MARGIN - _fixed_seconds(request, shape, machine)
        passes = affordable(usable, epoch_s + evaluation_seconds(val_tokens, shape, machine, 1))
        if passes < epochs:
            epochs = float(max(1, math.floor(passes)))
        if passes < 1 and request.order is not None:  # the most surprising exchanges, repeated
            epochs = float(request.epochs or SURPRISE_EPOCHS)
            kept = _fit(request, shape, machine, rows, checkpointing,
                        (usable - evaluation_seconds(val_tokens, shape, machine, math.ceil(epochs))) / epochs)
            batches, epoch_s, peak = _epoch(request, kept, rows, shape, machine, checkpointing)
        elif passes < 1:
            kept = _fit(request, shape, machine, rows, checkpointing,
                        usable - evaluation_seconds(val_tokens, shape, machine, 1))
            batches, epoch_s, peak = _epoch(request, kept, rows, shape, machine, checkpointing)
        if kept != everything or epochs != planned or shed:
            selection = "; ".join(shed + [_selection_text(request, kept, epochs, budget=request.budget_s)])
    return Choice(_plan(request, kept, batches, rows, epochs, checkpointing, epoch_s, peak, val_tokens,
                        math.ceil(epochs), shape, machine, selection), kept, rows, epochs, checkpointing,
                  rehearsal=request.rehearsal, report_answers=request.report_answers > 0, val_examples=val_kept,
                  max_batch_tokens=request.max_batch_tokens)


def _fit_memory(request: Request, kept: Sequence[Kept], rows: int, shape: Shape, machine: Machine):
    """(request, checkpointing, its `_epoch`) within the memory the run may use: gradient checkpointing
    where the steps need it (unless asked for or refused), then fewer tokens a step, down to the longest
    example alone. A --max-memory below that is refused with the minimum; a machine's own figure is only said."""
    limit = machine.memory.bytes
    checkpointing = bool(request.gradient_checkpointing)
    epoch = _epoch(request, kept, rows, shape, machine, checkpointing)
    if request.gradient_checkpointing is None and epoch[2] > limit:  # on only where memory needs it: it costs compute
        checkpointing = True
        epoch = _epoch(request, kept, rows, shape, machine, checkpointing)
    longest = max((length for i, n in kept for length in request.lengths[i][:n]), default=1)
    cap = request.max_batch_tokens or longest * rows
    while epoch[2] > limit and cap > longest:
        cap = max(longest, cap // 2)
        request = replace(request, max_batch_tokens=cap)
        epoch = _epoch(request, kept, rows, shape, machine, checkpointing)
    peak = epoch[2]
    if peak > limit and machine.memory.asked:
        raise ChatkitError(
            f"{machine.memory.how} is below what one step needs: at least {gib(peak)} (the weights and the "
            f"longest example, {longest} tokens{', with gradient checkpointing' if checkpointing else ''}); "
            f"raise --max-memory to {math.ceil(peak / 1e8) / 10:g}GB or more, or lower --max-length")
    return request, checkpointing, epoch


def _fixed_seconds(request: Request, shape: Shape, machine: Machine) -> float:
    """What a run costs besides training: start, rehearsal, preferences (DPO), saving and the report."""
    return (STARTUP_S + request.spent_s + rehearsal_seconds(request.rehearsal, request.ranking_tokens, shape, machine) + SAVE_S
            + preference_seconds(request.preference_tokens, request.preference_epochs, shape, machine)
            + report_seconds(request.report_answers, request.report_tokens, shape, machine,
                             request.report_prompt_tokens))


def _fewer_val(request: Request, count: int, report_too: bool = False) -> dict:
    """The changes to a request that keep `count` validation examples (and, with `report_too`, the report's
    loss measured on that share of its examples)."""
    share = min(1.0, count / max(1, request.val_examples))
    changes = dict(val_examples=min(count, request.val_examples), val_tokens=int(request.val_tokens * share))
    if report_too and request.val_examples:
        changes["report_tokens"] = int(request.report_tokens * share)
    return changes


def _shed_to_fit(request: Request, shape: Shape, machine: Machine, rows: int, checkpointing: bool):
    """Under a budget, validation keeps 16 examples; where everything else would take over half the budget
    (or more than it), the optional work goes first: the report's answers, then the rehearsal, then
    validation down to 4 examples.
    (request, notes) for what is left; a budget too short even then is refused."""
    request = replace(request, **_fewer_val(request, BUDGET_VAL_EXAMPLES))
    shed = []
    for note, lighter in (("the report's answers left out", dict(report_answers=0, report_prompt_tokens=0)),
                          ("no rehearsal", dict(rehearsal=0, extra=[], ranking_tokens=0)),
                          (f"validation on {BUDGET_MIN_VAL_EXAMPLES} examples",
                           _fewer_val(request, BUDGET_MIN_VAL_EXAMPLES, report_too=True))):
        overhead = _fixed_seconds(request, shape, machine) + evaluation_seconds(request.val_tokens, shape, machine, 1)
        if (_minimum(request, shape, machine, rows, checkpointing) <= request.budget_s
                and overhead <= OVERHEAD_SHARE * request.budget_s * BUDGET_MARGIN):
            break
        if note.startswith("validation") and request.val_examples <= BUDGET_MIN_VAL_EXAMPLES:
            continue
        request = replace(request, **lighter)
        shed.append(note)
    _check_minimum(request, shape, machine, rows, checkpointing)
    return request, shed


def _minimum(request: Request, shape: Shape, machine: Machine, rows: int, checkpointing: bool) -> float:
    """The shortest budget a run can keep: its fixed costs and one pass over the shortest conversation."""
    one_pass = _epoch(request, [_shortest(request)], rows, shape, machine, checkpointing)[1]
    return (_fixed_seconds(request, shape, machine) + one_pass
            + evaluation_seconds(request.val_tokens, shape, machine, 1)) / BUDGET_MARGIN


def _check_minimum(request: Request, shape: Shape, machine: Machine, rows: int, checkpointing: bool) -> None:
    """A budget that cannot hold loading, one pass over the shortest conversation, saving and the report's
    loss is refused, naming the least that would do."""
    needed = _minimum(request, shape, machine, rows, checkpointing)
    if request.budget_s < needed:
        raise ChatkitError(
            f"--time-budget {duration(request.budget_s)} is shorter than this run's fixed costs on this machine "
            f"(loading, one pass over the shortest conversation, "
            + (f"DPO on {len(request.preference_tokens)} preference pairs, " if request.preference_tokens else "")
            + f"saving and the report's loss): give at least "
            f"{duration(math.ceil(needed))}")


def _fit(request: Request, shape: Shape, machine: Machine, rows: int, checkpointing: bool,
         seconds: float) -> List[Kept]:
    """Whole conversations taken in a seeded random order, each one kept if the single pass over those kept
    still fits in `seconds` (a long one that does not fit is passed over, not the end of the sample); at
    least the shortest conversation. Measured against taking every conversation's opening first, which
    trains more conversations but did no better (docs/PERFORMANCE.md, "Choosing what a budget trains")."""
    kept: List[Kept] = []
    order = request.order if request.order is not None else sample_conversations(len(request.lengths), request.seed)
    for index in order:
        trial = kept + [(index, len(request.lengths[index]))]
        if request.lengths[index] and _epoch(request, trial, rows, shape, machine, checkpointing)[1] <= seconds:
            kept = trial
    return sorted(kept) or [_shortest(request)]


def _shortest(request: Request) -> Kept:
    """The shortest conversation that gives a training example (one whose exchanges were all too long gives none)."""
    index = min((i for i in range(len(request.lengths)) if request.lengths[i]), key=lambda i: sum(request.lengths[i]),
                default=0)
    return index, len(request.lengths[index]) if request.lengths else 0


def _selection_text(request: Request, kept: Sequence[Kept], epochs: float, budget: float) -> str:
    whole = len(kept) == len(request.lengths)
    if request.order is not None and not whole:
        return (f"the {len(kept)} most surprising of {len(request.lengths)} exchanges (the base model's loss on "
                f"them; near-duplicates left out), {epochs:g} epochs, to finish within {duration(budget)}; the "
                "learning-rate schedule is set for these steps")
    which = "every conversation" if whole else (f"a random sample of {len(kept)} of {len(request.lengths)} "
                                                f"conversations (seeded by --seed)")
    return (f"{which}, {epochs:g} epoch{'s' if epochs != 1 else ''}, to finish within {duration(budget)}; "
            "the learning-rate schedule is set for these steps")


def _plan(request, kept, batches, rows, epochs, checkpointing, epoch_s, peak, val_tokens, evaluations, shape,
          machine, selection) -> Plan:
    tokens = sum(length for i, n in kept for length in request.lengths[i][:n])
    steps = math.ceil(len(batches) / request.gradient_accumulation_steps * epochs)
    parts = {"start": STARTUP_S, "scoring": request.spent_s,
             "rehearsal": rehearsal_seconds(request.rehearsal, request.ranking_tokens, shape, machine),
             "training": epoch_s * epochs,
             "evaluation": evaluation_seconds(val_tokens, shape, machine, evaluations) if val_tokens else 0.0,
             "preferences": preference_seconds(request.preference_tokens, request.preference_epochs, shape, machine),
             "saving": SAVE_S,
             "report": report_seconds(request.report_answers, request.report_tokens, shape, machine,
                                  request.report_prompt_tokens)}
    return Plan(conversations=len(kept), examples=sum(n for _, n in kept), tokens=tokens,
                trained_tokens=round(_trained(request, kept)), epochs=epochs, steps=steps, batch_size=rows,
                max_batch_tokens=request.max_batch_tokens, gradient_checkpointing=checkpointing,
                estimated_seconds=round(sum(parts.values()), 1), estimated_peak_bytes=int(peak),
                estimate=machine.how, parts={k: round(v, 1) for k, v in parts.items()}, selection=selection,
                of_conversations=len(request.lengths), weights=_weights_text(shape),
                memory_limit_bytes=int(machine.memory.bytes),
                memory_limit=machine.memory.how + ("" if machine.memory.asked else "; --max-memory sets it"),
                units="exchanges" if request.order is not None else "conversations")


def _weights_text(shape: Shape) -> Optional[str]:
    if shape.weight_bits == 32:
        return None
    full = replace(shape, weight_bits=32)
    return (f"weights {shape.weight_bytes() / 2**30:.2f} GiB with the layers in {shape.weight_bits}-bit, "
            f"{full.weight_bytes() / 2**30:.2f} GiB in float32")

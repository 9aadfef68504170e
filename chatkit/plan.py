"""The plan of a training run, made before anything slow: batch, epochs, gradient checkpointing, what fits
a time budget, and the plan's time and peak memory.

Time is the work of each part (costs.py) at this machine's calibrated rate (machine.py, a matrix product
of under half a second); memory is the weights and the largest step's activations and logits, against
the memory the run may use.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

from .costs import (CHECKPOINTING_SLOWDOWN, QUANTIZED_SLOWDOWN, Shape, batch_widths, evaluation_seconds,  # noqa: F401
                    preference_seconds, rehearsal_seconds, report_seconds, training_seconds)
from .errors import ChatkitError
from .machine import Machine, MemoryLimit, calibrate, gib, memory_limit, parse_size  # noqa: F401 - the plan's machine
from .output import duration

STARTUP_S = 10.0  # imports and loading a cached model
SAVE_S = 3.0
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(min|sec|h|m|s)?", re.I)


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

    focus_exchanges: int = 0  # exchanges holding what the model does not know of the user's world ...
    focus_repeats: int = 0  # ... each trained this many times in the focus stage after the conversations ...
    focus_steps: int = 0  # ... in this many steps

    def describe(self) -> str:
        kept = f"{self.conversations} of {self.of_conversations}" if self.selection else f"{self.conversations}"
        lines = [f"plan: {kept} conversations, {self.examples} examples, {self.tokens:,} tokens "
                 f"({self.trained_tokens:,} trained); {self.epochs:g} epoch{'s' if self.epochs != 1 else ''}, {self.steps} steps "
                 f"of up to {self.batch_size} example{'s' if self.batch_size != 1 else ''}" + (f" and {self.max_batch_tokens} tokens"
                                                           if self.max_batch_tokens else "")]
        if self.focus_exchanges:
            lines.append(f"  then the focus: {self.focus_exchanges} exchanges x {self.focus_repeats}, {self.focus_steps} "
                         f"steps of up to {FOCUS_BATCH} examples")
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
# A budget shorter than the schedule ends with a focus stage: the exchanges that hold what the model does
# not know of the user's world (selection.py), this many times each, within this share of the training
# time, after the conversations and with a learning-rate schedule of its own. A fact seen once is not
# learned; mixed among the conversations, eight times were not enough either: the conversations' steps
# wash it out (docs/PERFORMANCE.md, "Choosing what a budget trains").
FOCUS_REPEATS = 8
FOCUS_SHARE = 1 / 3
# When every such exchange fits with room in the share to spare, and they are at least FOCUS_MANY, they are
# repeated more, up to this many times: on the shared export at 30 minutes, 16 repeats recalled 12 planted
# facts of 12 where 8 recalled 9. A handful of exchanges repeated 16 times pull the model towards their
# answers instead (5 minutes on the shared export, 2 exchanges: the report's loss 2.298 -> 2.363 at 16
# repeats, -> 2.236 at 8).
FOCUS_MAX_REPEATS = 16
FOCUS_MANY = 12
# ... in steps of at most 3 examples: a fact is learned in optimizer steps, not tokens (on the quality set
# batch 3 recalled 12 facts where batch 6 recalled 9).
FOCUS_BATCH = 3
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
    # per exchange a budget trains first, the most valuable first: (tokens, trained tokens)
    focus: List[Tuple[int, int]] = field(default_factory=list)
    spent_s: float = 0.0  # seconds spent choosing before the plan (reading the exchanges)


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
    focus: int = 0  # the first `focus` of the request's focus exchanges are trained in the focus stage ...
    focus_copies: int = 0  # ... this many times each
    shortened: bool = False  # a time budget took passes or conversations from the schedule


def _trained(request: Request, kept: Sequence[Kept]) -> float:
    """The trained tokens of the kept examples (of a conversation's first examples, their share of its tokens)."""
    return sum(request.trained[i] * sum(request.lengths[i][:n]) / max(1, sum(request.lengths[i])) for i, n in kept)


Focus = Tuple[int, int]  # how many of the request's focus exchanges, and their copies in an epoch


def _epoch(request: Request, kept: Sequence[Kept], rows: int, shape: Shape, machine: Machine, checkpointing,
           focus: Focus = (0, 0)):
    """(batches, epoch seconds, peak bytes) for one pass over the kept conversations (and focus exchanges)."""
    from .examples import token_batches

    count, copies = focus
    lengths = ([length for i, n in kept for length in request.lengths[i][:n]] + list(request.extra)
               + [length for length, _ in request.focus[:count]] * copies)
    tokens = sum(lengths)
    trained = _trained(request, kept) + sum(request.extra) // 2 + copies * sum(t for _, t in request.focus[:count])
    share = trained / tokens if tokens else 1.0
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
    selection, shed, val_kept, val_tokens, focus, focus_batches = None, [], None, request.val_tokens, (0, 0), None
    if request.budget_s is not None:
        request, shed = _shed_to_fit(request, shape, machine, rows, checkpointing)
        # validation as the budget left it: at most 16 examples, or 4 where it gave way
        val_kept, val_tokens = request.val_examples, request.val_tokens
        usable = request.budget_s * BUDGET_MARGIN - _fixed_seconds(request, shape, machine)
        passes = affordable(usable, epoch_s + evaluation_seconds(val_tokens, shape, machine, 1))
        if passes < epochs and request.focus:
            kept, epochs, focus, focus_batches = _fit_with_focus(request, shape, machine, rows, checkpointing, usable,
                                                                 val_tokens, epochs)
            batches, epoch_s, peak = _epoch(request, kept, rows, shape, machine, checkpointing)
        elif passes < epochs:
            epochs = float(max(1, math.floor(passes)))
            if passes < 1:
                kept = _fit(request, shape, machine, rows, checkpointing,
                            usable - evaluation_seconds(val_tokens, shape, machine, 1))
                batches, epoch_s, peak = _epoch(request, kept, rows, shape, machine, checkpointing)
        if kept != everything or epochs != planned or shed or focus[0]:
            selection = "; ".join(shed + [_selection_text(request, kept, epochs, request.budget_s, focus)])
    return Choice(_plan(request, kept, batches, rows, epochs, checkpointing, epoch_s, peak, val_tokens,
                        math.ceil(epochs), shape, machine, selection, focus, focus_batches), kept, rows, epochs,
                  checkpointing,
                  rehearsal=request.rehearsal, report_answers=request.report_answers > 0, val_examples=val_kept,
                  max_batch_tokens=request.max_batch_tokens, focus=focus[0], focus_copies=focus[1],
                  shortened=kept != everything or epochs != planned)


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


def _fit_with_focus(request: Request, shape: Shape, machine: Machine, rows: int, checkpointing: bool, usable: float,
                    val_tokens: int, planned: float):
    """(conversations kept, epochs, focus, the focus stage's (batches, seconds)) for a budget shorter than the
    schedule: the focus stage's exchanges, FOCUS_REPEATS times each in steps of FOCUS_BATCH, within FOCUS_SHARE
    of `usable` (the most valuable first; the rehearsal examples go with them), and more times each, up to
    FOCUS_MAX_REPEATS, where they all fit with room to spare and are FOCUS_MANY or more; then, in what is left,
    every conversation for as many passes as fit, or one pass over a random sample of whole ones."""
    def stage(count: int, copies: int = FOCUS_REPEATS):
        return _epoch(request, [], FOCUS_BATCH, shape, machine, checkpointing, (count, copies))

    def fits(count: int, copies: int = FOCUS_REPEATS) -> bool:
        return stage(count, copies)[1] + evaluation <= FOCUS_SHARE * usable

    evaluation = evaluation_seconds(val_tokens, shape, machine, 1)
    low, high = 0, len(request.focus)  # the most exchanges whose repeats fit the share (cost grows with count)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    copies = FOCUS_REPEATS if low else 0
    while low >= FOCUS_MANY and copies < FOCUS_MAX_REPEATS and fits(low, copies + 1):
        copies += 1
    batches, seconds, _ = stage(low, copies)
    rest = usable - (seconds + evaluation if low else 0.0)
    everything = [(i, len(examples)) for i, examples in enumerate(request.lengths)]
    passes = affordable(rest, _epoch(request, everything, rows, shape, machine, checkpointing)[1] + evaluation)
    if passes >= 1:
        kept, epochs = everything, float(min(planned, math.floor(passes)))
    else:
        kept, epochs = _fit(request, shape, machine, rows, checkpointing, rest - evaluation), 1.0
    return kept, epochs, (low, copies), (len(batches), seconds) if low else None


def _fit(request: Request, shape: Shape, machine: Machine, rows: int, checkpointing: bool,
         seconds: float) -> List[Kept]:
    """Whole conversations taken in a seeded random order, each one kept if the single pass over those kept
    still fits in `seconds` (a long one that does not fit is passed over, not the end of the sample); at
    least the shortest conversation. Measured against taking every conversation's opening first, which
    trains more conversations but did no better (docs/PERFORMANCE.md, "Choosing what a budget trains")."""
    kept: List[Kept] = []
    for index in sample_conversations(len(request.lengths), request.seed):
        trial = kept + [(index, len(request.lengths[index]))]
        if request.lengths[index] and _epoch(request, trial, rows, shape, machine, checkpointing)[1] <= seconds:
            kept = trial
    return sorted(kept) or [_shortest(request)]


def _shortest(request: Request) -> Kept:
    """The shortest conversation that gives a training example (one whose exchanges were all too long gives none)."""
    index = min((i for i in range(len(request.lengths)) if request.lengths[i]), key=lambda i: sum(request.lengths[i]),
                default=0)
    return index, len(request.lengths[index]) if request.lengths else 0


def _selection_text(request: Request, kept: Sequence[Kept], epochs: float, budget: float, focus: Focus) -> str:
    whole = len(kept) == len(request.lengths)
    which = "every conversation" if whole else (f"a random sample of {len(kept)} of {len(request.lengths)} "
                                                f"conversations (seeded by --seed)")
    then = (f"; then the {focus[0]} exchanges that hold most of the words the model does not know and that recur "
            f"across your conversations, {focus[1]} times each" if focus[0] else "")
    return (f"{which}, {epochs:g} epoch{'s' if epochs != 1 else ''}{then}, to finish within {duration(budget)}; "
            "the learning-rate schedule is set for these steps")


def _plan(request, kept, batches, rows, epochs, checkpointing, epoch_s, peak, val_tokens, evaluations, shape,
          machine, selection, focus: Focus = (0, 0), focus_stage: Optional[Tuple[int, float]] = None) -> Plan:
    count, copies = focus
    focus_steps, focus_s = focus_stage or (0, 0.0)
    evaluations += 1 if focus_steps else 0  # the focus stage's, at its end
    tokens = sum(length for i, n in kept for length in request.lengths[i][:n])  # the conversations' (the focus: below)
    steps = math.ceil(len(batches) / request.gradient_accumulation_steps * epochs)
    parts = {"start": STARTUP_S, "scoring": request.spent_s,
             "rehearsal": rehearsal_seconds(request.rehearsal, request.ranking_tokens, shape, machine),
             "training": epoch_s * epochs, "focus": focus_s,
             "evaluation": evaluation_seconds(val_tokens, shape, machine, evaluations) if val_tokens else 0.0,
             "preferences": preference_seconds(request.preference_tokens, request.preference_epochs, shape, machine),
             "saving": SAVE_S,
             "report": report_seconds(request.report_answers, request.report_tokens, shape, machine,
                                  request.report_prompt_tokens)}
    return Plan(conversations=len(kept), examples=sum(n for _, n in kept), tokens=tokens,
                trained_tokens=round(_trained(request, kept)),
                epochs=epochs, steps=steps, batch_size=rows,
                max_batch_tokens=request.max_batch_tokens, gradient_checkpointing=checkpointing,
                estimated_seconds=round(sum(parts.values()), 1), estimated_peak_bytes=int(peak),
                estimate=machine.how, parts={k: round(v, 1) for k, v in parts.items()}, selection=selection,
                of_conversations=len(request.lengths), weights=_weights_text(shape),
                memory_limit_bytes=int(machine.memory.bytes),
                memory_limit=machine.memory.how + ("" if machine.memory.asked else "; --max-memory sets it"),
                focus_exchanges=count, focus_repeats=copies, focus_steps=focus_steps)


def _weights_text(shape: Shape) -> Optional[str]:
    if shape.weight_bits == 32:
        return None
    full = replace(shape, weight_bits=32)
    return (f"weights {shape.weight_bytes() / 2**30:.2f} GiB with the layers in {shape.weight_bits}-bit, "
            f"{full.weight_bytes() / 2**30:.2f} GiB in float32")

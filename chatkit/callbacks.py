"""The Trainer's callbacks: Ctrl-C (save after this step and stop), the time budget kept (the rest of a
late run re-planned), freed memory returned, tokens per second, and the progress display."""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

from transformers import TrainerCallback

from .output import Progress, say


def perplexity(loss: float) -> float:
    return round(math.exp(min(loss, 50)), 2)


class StopOnInterrupt:
    """First Ctrl-C: finish the current step, save a checkpoint and stop. Second Ctrl-C: stop now."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            say("\nInterrupted: saving a checkpoint after this step (Ctrl-C again to stop at once)...")

        try:
            self.previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


class Interrupt(TrainerCallback):
    """Turns a requested stop into: save at the end of this step (no evaluation first), then stop."""

    def __init__(self, stop: StopOnInterrupt):
        self.stop = stop

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.requested:
            control.should_save = True
            control.should_evaluate = False
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stop.requested:  # saved at the step's end already; no validation pass before exiting
            control.should_save = False
            control.should_evaluate = False


BUDGET_FILE = "budget.json"  # beside the checkpoints: how much of the time budget the run has spent


@dataclass
class Deadline:
    """A time budget for the rest of the command: training ends in time for what comes after it.

    `finish_by` is the time.time() by which the whole command must be done; `after_s` the plan's
    seconds for the computing that follows training (the last evaluation, DPO, the report), at the plan's
    rate, and `saving_s` for writing the model (disk, not slowed by a busy CPU); `planned_step_s` the
    plan's seconds per step, from which the machine's slowdown is measured."""

    finish_by: float
    after_s: float
    planned_step_s: float
    saving_s: float = 0.0
    report_s: float = 0.0  # the part of after_s that comes after the preferences (DPO): the report
    evaluation_s: float = 0.0  # the part of after_s for each evaluation, done as the epochs end
    evaluations: int = 0  # how many evaluations after_s holds
    planned_tokens: int = 0  # the tokens the planned steps train (all epochs): steps are measured per token
    planned_steps: int = 0
    started: float = 0.0  # when this command started (time.time())
    used_before_s: float = 0.0  # the budget an interrupted run had spent, for a resumed one
    changes: List[dict] = None  # each time the rest of the run was shortened: step, steps before and after, why
    stage: str = ""  # which stage's steps these are, where a run has two (the focus stage)

    def __post_init__(self):
        if self.changes is None:
            self.changes = []

    def describe(self) -> Optional[str]:
        if not self.changes:
            return None
        last = self.changes[-1]
        first = next(change for change in self.changes if change.get("stage") == last.get("stage"))
        what = last.get("stage") or "training"
        return (f"the machine ran {last['slowdown']:.1f}x slower than planned, so {what} stopped after "
                f"{last['to_steps']} of {first['from_steps']} planned steps, the learning rate brought "
                "down over the steps left, to finish within the time budget")


class KeepDeadline(TrainerCallback):
    """Re-plans the rest of a run that falls behind its time budget (a busy machine, a slower one).

    After each step it projects the finish from the time per trained token measured so far (the recent
    steps' and the average, whichever is slower: steps differ in width, and the widest come first) and
    the work that follows training, scaled by the same slowdown against the plan's time per token.
    Evaluations and checkpoints between steps are not counted as steps' time.
    When that is past the deadline, the run is shortened to the steps that fit, and the learning rate
    schedule is recomputed to decay from where it is to zero at the new last step, so the run ends as
    a finished schedule, not cut off at a high learning rate.
    """

    SMOOTHING = 0.3  # weight of the newest step in the recent step time
    # Before SETTLE_STEPS steps are measured (after the first), the run is re-planned only when it would
    # overrun by more than SETTLE_SLACK: on the real export one 7.2 s step (the plan's mean 6.5 s) cut a
    # 5-minute run 4 steps short, and it ended 73 s early (docs/PERFORMANCE.md).
    SETTLE_STEPS = 3
    SETTLE_SLACK = 1.25

    def __init__(self, deadline: Deadline):
        self.deadline = deadline
        self.last = None
        self.first_step = 0
        self.first_done = None
        self.recent = None
        self.last_tokens = self.first_tokens = 0
        self.paused_s = 0.0  # evaluating and saving between steps since the first one: not a step's time

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = state.global_step

    def _paused(self) -> None:
        """An evaluation or a checkpoint ran since the last step: its time is not counted as a step's."""
        now = time.time()
        if self.last is not None:
            if self.first_done is not None:
                self.paused_s += now - self.last
            self.last = now

    def on_evaluate(self, args, state, control, **kwargs):
        self._paused()
        # an evaluation between epochs is done: what follows training no longer holds its time
        if self.deadline.evaluations > 0:
            self.deadline.evaluations -= 1
            self.deadline.after_s = max(0.0, self.deadline.after_s - self.deadline.evaluation_s)

    def on_save(self, args, state, control, **kwargs):
        """How much of the budget is spent, beside the checkpoints: a resumed run has only the rest."""
        import json
        import os

        used = self.deadline.used_before_s + time.time() - self.deadline.started
        with open(os.path.join(args.output_dir, BUDGET_FILE), "w", encoding="utf-8") as handle:
            json.dump({"used_s": round(used, 1)}, handle)
        self._paused()

    def _measure(self, state, now: float) -> Optional[Tuple[float, float, float]]:
        """(seconds per unit of work, units left, the plan's seconds per unit) after this step, the unit a
        trained token where the Trainer counts them, else a step; None before two steps are measured."""
        tokens = getattr(state, "num_input_tokens_seen", 0) or 0
        by_tokens = tokens > 0 and self.deadline.planned_tokens > 0 and self.deadline.planned_steps > 0
        work = (tokens - self.last_tokens) if by_tokens else 1
        if self.last is not None and work > 0:
            rate = (now - self.last) / work
            self.recent = rate if self.recent is None else self.SMOOTHING * rate + (1 - self.SMOOTHING) * self.recent
        if state.global_step == self.first_step + 1:
            self.first_done, self.first_tokens = now, tokens  # the first step pays for warm-up: averages start after it
        self.last, self.last_tokens = now, tokens
        done = (tokens - self.first_tokens) if by_tokens else state.global_step - self.first_step - 1
        if done < 1 or self.recent is None or self.first_done is None:
            return None
        rate = max(self.recent, (now - self.first_done - self.paused_s) / done)
        steps_left = state.max_steps - state.global_step
        if not by_tokens:
            return rate, steps_left, self.deadline.planned_step_s
        planned, steps = self.deadline.planned_tokens, max(1, self.deadline.planned_steps)
        planned_rate = self.deadline.planned_step_s * steps / planned
        # the planned steps' tokens not trained yet (at least half their mean, where the plan counted short),
        # for the steps left now (fewer, once the run was shortened)
        left = max(planned - tokens, 0.5 * (steps - state.global_step) * planned / steps)
        return rate, left * steps_left / max(1, steps - state.global_step), planned_rate

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        now = time.time()
        measured = self._measure(state, now)
        if state.global_step >= state.max_steps:
            control.should_training_stop = True
            return
        if measured is None:
            return
        rate, work_left, planned_rate = measured
        slowdown = max(1.0, rate / planned_rate) if planned_rate > 0 else 1.0
        left_s = self.deadline.finish_by - now - self.deadline.saving_s - self.deadline.after_s * slowdown
        steps_left = state.max_steps - state.global_step
        if work_left * rate <= left_s:
            return
        if state.global_step - self.first_step - 1 < self.SETTLE_STEPS and work_left * rate <= left_s * self.SETTLE_SLACK:
            return  # one or two steps of varying widths are a noisy sample: only a clear overrun re-plans yet
        step_s = rate * work_left / max(1, steps_left)
        fits = max(0, int(left_s // step_s))
        new_total = state.global_step + fits
        self.deadline.changes.append({"step": state.global_step, "from_steps": state.max_steps, "to_steps": new_total,
                                      "slowdown": round(slowdown, 2), "step_s": round(step_s, 3)}
                                     | ({"stage": self.deadline.stage} if self.deadline.stage else {}))
        if fits == 0:
            control.should_training_stop = True
            state.max_steps = state.global_step
            return
        if lr_scheduler is not None:
            reschedule(lr_scheduler, state.global_step, new_total)
        state.max_steps = new_total


def reschedule(scheduler, step: int, last_step: int) -> None:
    """Make a LambdaLR schedule decay from its value at `step` to zero at `last_step` (half a cosine)."""
    scheduler = getattr(scheduler, "scheduler", scheduler)  # under accelerate's wrapper
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if not lambdas:
        return
    starts = [fn(step) for fn in lambdas]
    span = max(1, last_step - step)

    def decay(start):
        return lambda at: start * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, at - step) / span)))

    scheduler.lr_lambdas = [decay(start) for start in starts]


class ReturnFreedMemory(TrainerCallback):
    """After each step, hand freed heap memory back to the system (glibc's malloc_trim).

    Steps of varying shapes leave the C heap fragmented: on the real export, without this the run's
    peak grew about 1 GiB above what one step needs (docs/PERFORMANCE.md). A trim walks the whole heap,
    so it runs at most every EVERY_S seconds: short steps would pay for it many times over.
    """

    EVERY_S = 2.0  # real-export steps take ~4 s: each is followed by a trim; 0.75 s steps, every third

    def __init__(self):
        import ctypes
        import ctypes.util

        try:
            self.trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
            self.trim = None
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.trim is not None and time.perf_counter() - self.last >= self.EVERY_S:
            self.trim(0)
            self.last = time.perf_counter()

    on_evaluate = on_step_end


class Throughput(TrainerCallback):
    """Adds trained tokens per second to each log line (and so to TensorBoard)."""

    def __init__(self):
        self.last = (time.perf_counter(), 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        now, seen = time.perf_counter(), state.num_input_tokens_seen
        elapsed = now - self.last[0]
        if elapsed > 0:
            logs["tokens_per_second"] = round((seen - self.last[1]) / elapsed, 1)
        self.last = (now, seen)


class ProgressReport(TrainerCallback):
    """One progress display (loss, learning rate, ETA) and one line per evaluation; no raw log dicts."""

    progress: Optional[Progress] = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.progress = Progress(state.max_steps, first_step=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.set_total(state.max_steps)
            self.progress.update(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress and logs and "loss" in logs:
            self.progress.update(state.global_step, loss=logs["loss"], learning_rate=logs.get("learning_rate"))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.progress and metrics and "eval_loss" in metrics:
            loss = metrics["eval_loss"]
            self.progress.write(f"evaluation at step {state.global_step}: validation loss {loss:.4f} "
                                f"(perplexity {perplexity(loss)})")

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.close()
            self.progress = None  # evaluations after training are reported by the caller

"""A time budget as the engine keeps it: when the command started, the deadline, and what the record says."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .errors import ChatkitError
from .files import read_json_object
from .plan import parse_duration
from .runfolder import CHECKPOINTS

if TYPE_CHECKING:
    from .options import TrainOptions

STARTED = time.time()  # when the package was imported: close to the command's start


DEADLINE_SHARE = 0.95  # of a time budget: the rest is for exiting and what no estimate sees


PROCESS_START_WITHIN_S = 60.0  # a process older than this at train() is a notebook or a test, not this command


def command_started() -> float:
    """When this command started (time.time()): a time budget counts from there. That is the process's start,
    imports included, or this call's where the process has been running for longer (a notebook, a test)."""
    now = time.time()
    try:
        import psutil

        started = psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing or refused: the package's import time is close
        started = STARTED
    return started if now - started < PROCESS_START_WITHIN_S else now


def make_deadline(options: TrainOptions, plan, checkpoint: Optional[str], epoch_tokens: Optional[int] = None):
    """The time budget as the engine keeps it (None without --time-budget). A resumed run has what the
    interrupted one left (its spent time is kept beside the checkpoints). `epoch_tokens`: the tokens one
    epoch trains (the data's and the rehearsal examples'), by which the steps' times are measured."""
    if not options.time_budget:
        return None
    from .callbacks import BUDGET_FILE, Deadline

    used = 0.0
    spent = Path(options.output) / CHECKPOINTS / BUDGET_FILE
    if checkpoint is not None and spent.is_file():
        used = read_json_object(spent, "delete it to count the budget from now").get("used_s", 0.0)
        if isinstance(used, bool) or not isinstance(used, (int, float)) or not 0 <= used < float("inf"):
            raise ChatkitError(f"{spent}: used_s should be the seconds of the budget spent, not {used!r}; delete "
                               "the file to count the budget from now")
    started = command_started()
    parts = plan.parts
    evaluations = max(1, math.ceil(plan.epochs)) + (1 if plan.focus_steps else 0)  # one as each epoch ends
    return Deadline(finish_by=started + parse_duration(options.time_budget) * DEADLINE_SHARE - used,
                    after_s=(parts.get("report", 0) + parts.get("evaluation", 0) + parts.get("preferences", 0)
                             + parts.get("focus", 0)),
                    report_s=parts.get("report", 0), saving_s=parts.get("saving", 0),
                    evaluation_s=parts.get("evaluation", 0) / evaluations, evaluations=evaluations,
                    planned_step_s=parts.get("training", 0) / max(plan.steps, 1), started=started,
                    planned_tokens=round((epoch_tokens or plan.tokens) * plan.epochs), planned_steps=plan.steps,
                    used_before_s=used)


def focus_deadline(deadline, plan, epoch_tokens: int):
    """The deadline of the focus stage, after the conversations: the same finish, what follows it (its
    evaluation, DPO, the report), and its own planned steps to measure its steps against. Its changes are
    the run's (one list)."""
    if deadline is None:
        return None
    from .callbacks import Deadline

    focus_s = plan.parts.get("focus", 0.0)
    return Deadline(finish_by=deadline.finish_by, after_s=max(0.0, deadline.after_s - focus_s),
                    report_s=deadline.report_s, saving_s=deadline.saving_s, evaluation_s=deadline.evaluation_s,
                    evaluations=deadline.evaluations, planned_step_s=focus_s / max(1, plan.focus_steps),
                    planned_tokens=epoch_tokens, planned_steps=plan.focus_steps, started=deadline.started,
                    used_before_s=deadline.used_before_s, changes=deadline.changes, stage="the focus stage")


def budget_record(plan, deadline, metrics: dict) -> Optional[dict]:
    """What chatkit.json and the card say of a time budget: planned, trained, and why they differ."""
    if deadline is None:
        return None
    trained_steps = metrics.get("steps", 0)
    why = [deadline.describe() or f"{trained_steps} steps as planned"]
    if metrics.get("dpo_stopped"):
        why.append(f"DPO stopped after {metrics['dpo_steps']} of {metrics['dpo_planned_steps']} steps "
                   f"({metrics['dpo_stopped']})")
    return {"planned_steps": plan.steps + plan.focus_steps, "trained_steps": trained_steps, "changes": deadline.changes,
            "summary": "; ".join(why)}

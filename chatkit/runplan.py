"""The hand-off between planning a run and running it: the options as asked, and what the plan resolved."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .options import TrainOptions
from .plan import Plan


@dataclass(frozen=True)
class RunPlan:
    """What planning resolved for a run. Every stage after the plan reads these values here, and the rest
    of what the user asked from `options`.

    `max_length` is --max-length as the model's positions allow; `rehearsal` and `max_batch_tokens` the
    counts given or the machine's defaults; the rest is the plan's choice (`report` is "none" where a
    time budget left no room for the report's answers)."""

    options: TrainOptions
    max_length: int
    rehearsal: int
    max_batch_tokens: int
    batch_size: Optional[int] = None
    epochs: Optional[float] = None
    gradient_checkpointing: Optional[bool] = None
    report: str = "full"
    focus_copies: int = 0  # each focus exchange's copies in the focus stage, after the conversations
    plan: Optional[Plan] = None

    @classmethod
    def asked(cls, options: TrainOptions, **resolved) -> "RunPlan":
        """The run as the options give it, before a plan (or without one: a test, a bench)."""
        values = dict(max_length=options.max_length, rehearsal=options.rehearsal or 0,
                      max_batch_tokens=options.max_batch_tokens, batch_size=options.batch_size,
                      epochs=options.epochs, gradient_checkpointing=options.gradient_checkpointing,
                      report=options.report)
        return cls(options, **(values | resolved))

    def recorded_options(self) -> dict:
        """The options as chatkit.json keeps them: what was asked, with the values the run used."""
        resolved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("options", "plan")}
        return dataclasses.asdict(self.options) | resolved | {"learning_rate": self.options.effective_learning_rate}

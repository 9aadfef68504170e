"""The report's side of a run: the prompts and examples both models are measured on, and writing it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

from .dpo import preference_summary
from .models import ModelSource, public_name
from .plan import BUDGET_VAL_EXAMPLES
from .report import (PLOT_FILE, REPORT_FILE, RunFacts, Side, chosen_prompts, loss_examples, measure, report_prompts,
                     system_prompts)

if TYPE_CHECKING:
    from .device import Placement
    from .runplan import RunPlan
    from .rundata import Data


def report_chosen(run: RunPlan, data: Data):
    """The user's prompts the report asks both models (none with --report none)."""
    return chosen_prompts(data.val_conversations, data.conversations) if run.report == "full" else []


def report_questions(run: RunPlan, chosen) -> List[str]:
    """Everything the report asks both models: the `chosen` prompts of the user's, then the general questions."""
    return report_prompts(chosen) if run.report == "full" else []


def report_examples(data: Data, time_budget: Optional[str] = None):
    """The examples the loss before and after is measured on, and which split they are from (a time budget
    keeps fewer validation examples)."""
    val = data.val[:BUDGET_VAL_EXAMPLES] if time_budget else data.val
    return loss_examples(val, [e for group in data.train for e in group])


class ReportRun:
    """The report's measurements: the same examples and prompts for the base model and the trained one."""

    def __init__(self, run: RunPlan, data: Data, placement: Placement):
        self.run, self.options, self.data, self.placement = run, run.options, data, placement
        self.chosen = report_chosen(run, data)
        self.questions = report_questions(run, self.chosen)
        self.examples, self.loss_on = report_examples(data)  # data was cut to the budget's validation already
        self.base: Optional[Side] = None
        self.seconds = 0.0

    def _measure(self, model, tokenizer) -> Side:
        import time

        started = time.perf_counter()
        side = measure(model, tokenizer, self.questions, self.examples, self.options.system_prompt)
        self.seconds += time.perf_counter() - started
        return side

    def measure_base(self, model, tokenizer) -> None:
        from .report import adapter_off

        with adapter_off(model):
            self.base = self._measure(model, tokenizer)

    def measure_trained(self, model, tokenizer) -> Side:
        """The trained model's side (and, for LoRA, the base model's: the same weights with the adapter off)."""
        import time

        from .report import measure_both

        if self.base is not None:
            return self._measure(model, tokenizer)
        started = time.perf_counter()
        self.base, trained = measure_both(model, tokenizer, self.questions, self.examples, self.options.system_prompt)
        self.seconds += time.perf_counter() - started
        return trained

    def figures(self, trained: Side) -> dict:
        """What the run's record says of the report."""
        return {"report_s": round(self.seconds, 1), "loss_before": self.base.loss, "loss_after": trained.loss}

    def write(self, folder: Path, trained: Side, source: ModelSource, metrics: dict, state, record: dict) -> str:
        """report.md, loss.png and README.md in `folder` (the model's staging folder); returns the line to print."""
        from .report import plot_loss, summary_line, write_texts

        output = Path(self.options.output)
        plot_loss(state.log_history, folder / PLOT_FILE)
        facts = RunFacts(output=str(output), data_files=[Path(f).name for f in self.options.data],
                         conversations=self.data.report.conversations, examples=self.data.report.examples,
                         tokens=self.data.report.tokens, trained_tokens=self.data.report.trained_tokens,
                         base_model=public_name(source), method=self.options.method,
                         seconds=metrics.get("train_runtime_s", 0.0), device=self.placement.describe(),
                         epochs=self.run.epochs or 0, steps=state.global_step,
                         loss_on=self.loss_on, measured_examples=len(self.examples),
                         budget=(metrics.get("time_budget") or {}).get("summary"),
                         preferences=preference_summary(metrics),
                         system_prompts=system_prompts(self.data.conversations, self.options.system_prompt),
                         record=record)
        write_texts(folder, facts, self.base, trained, self.chosen, adapter=self.options.lora)
        summary = summary_line(self.base, trained, len(self.chosen))
        return f"Report: {output / REPORT_FILE} ({summary}; {self.seconds:.0f} s)"

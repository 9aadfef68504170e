"""What the user sees on stderr: stage lines, library noise kept out, and training progress with ETA.

Quiet by default: library warnings, notices and the libraries' own progress bars are hidden unless
`--verbose` or CHATKIT_DEBUG=1. Progress is a bar on a terminal and plain timed lines in a log file
(no carriage returns or escape codes there).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import warnings
from typing import Optional

NOISY_LOGGERS = ("transformers", "peft", "bitsandbytes", "accelerate", "datasets", "huggingface_hub", "torch",
                 "httpx", "gradio", "urllib3", "matplotlib", "uvicorn", "gguf", "kernels")


def say(*parts) -> None:
    """One line for the user, on stderr (stdout is kept for results)."""
    print(*parts, file=sys.stderr, flush=True)


def verbose_requested() -> bool:
    return bool(os.environ.get("CHATKIT_DEBUG")) or os.environ.get("CHATKIT_VERBOSE") == "1"


def set_verbosity(verbose: bool = False) -> None:
    """Hide (or, verbose, show) library warnings, notices and progress bars; before or after their import."""
    verbose = verbose or verbose_requested()
    os.environ["CHATKIT_VERBOSE"] = "1" if verbose else "0"
    if verbose:
        warnings.resetwarnings()
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        quiet_transformers()


def quiet_transformers() -> None:
    """transformers' notices and its own bars (weights loading, GGUF conversion) off; Hub download bars stay."""
    if os.environ.get("CHATKIT_VERBOSE") == "1":
        return
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    enable_progress_bars()  # a download says how far it is


@contextlib.contextmanager
def no_library_bars():
    """Within the block, what libraries write on stderr (bars drawn with tqdm directly, not through their
    logging) is held back, unless --verbose: the caller has said what is happening and how long it takes.
    Errors still arrive as exceptions."""
    if os.environ.get("CHATKIT_VERBOSE") == "1":
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def duration(seconds: float) -> str:
    """12 s, 3 min 05 s, 1 h 02 min."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Steps done, loss, learning rate and ETA: a bar on a terminal, a line every ~30 s in a log."""

    LINE_EVERY_S = 30.0

    def __init__(self, total: int, stream=None, first_step: int = 0):
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.first_step = first_step
        self.started = time.perf_counter()
        self.last_line = 0.0
        self.step = first_step
        self.printed: Optional[int] = None  # the step of the last plain line
        self.loss: Optional[float] = None
        self.learning_rate: Optional[float] = None
        self.bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=first_step, file=self.stream, dynamic_ncols=True, unit="step",
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}")

    def set_total(self, total: int) -> None:
        """A run re-planned to fewer steps (a time budget kept on a slower machine)."""
        if total != self.total:
            self.total = total
            if self.bar is not None:
                self.bar.total = total
                self.bar.refresh()

    def eta(self, step: int) -> Optional[float]:
        done = step - self.first_step
        if done <= 0:
            return None
        return (time.perf_counter() - self.started) / done * (self.total - step)

    def figures(self) -> str:
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.learning_rate is not None:
            parts.append(f"lr {self.learning_rate:.2e}")
        return ", ".join(parts)

    def update(self, step: int, loss: Optional[float] = None, learning_rate: Optional[float] = None) -> None:
        self.loss = loss if loss is not None else self.loss
        self.learning_rate = learning_rate if learning_rate is not None else self.learning_rate
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(self.figures(), refresh=False)
            self.bar.refresh()
            return
        self.step = step
        now = time.perf_counter()
        if self.printed is None or now - self.last_line >= self.LINE_EVERY_S:
            self.line(step)

    def line(self, step: int) -> None:
        """A plain progress line (logs): step, figures, time so far and left."""
        self.last_line, self.printed = time.perf_counter(), step
        eta = self.eta(step)
        figures = self.figures()
        self.write(f"step {step}/{self.total}" + (f", {figures}" if figures else "")
                   + f", {duration(self.last_line - self.started)} elapsed"
                   + (f", about {duration(eta)} left" if eta and step < self.total else ""))

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """End the display; a log gets a last line with the final figures."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.printed is not None and self.printed != self.step:
            self.line(self.step)

#!/usr/bin/env python3
"""What the training report costs: the README's training run with `--report full` and `--report none`.

    python bench/report_time.py                 # 2 rounds, alternating
    python bench/report_time.py --rounds 3

Each round runs `train_chatgpt_model.py --data example_chatgpt_data.json` (default flags, as the README
does) once with the report and once without, alternating which goes first, and prints each run's wall
time (the whole command) and the report's own seconds (`report_s` in chatkit.json), then the means and
the report's share of a default run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(report: str, output: Path):
    started = time.perf_counter()
    subprocess.run([sys.executable, "train_chatgpt_model.py", "--data", "example_chatgpt_data.json", "--output",
                    str(output), "--overwrite", "--report", report], cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    metrics = json.loads((output / "chatkit.json").read_text())["metrics"]
    return wall, metrics.get("report_s", 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="report-bench-"))
    walls = {"full": [], "none": []}
    reports = []
    for round_ in range(args.rounds):
        order = ("full", "none") if round_ % 2 == 0 else ("none", "full")
        for report in order:
            wall, seconds = run(report, work / report)
            walls[report].append(wall)
            if report == "full":
                reports.append(seconds)
            print(f"round {round_ + 1}, --report {report}: {wall:.1f} s" +
                  (f" (report {seconds:.1f} s)" if report == "full" else ""), flush=True)
    full, none = (sum(walls[k]) / len(walls[k]) for k in ("full", "none"))
    report = sum(reports) / len(reports)
    print(f"mean: --report full {full:.1f} s, --report none {none:.1f} s; the report {report:.1f} s "
          f"= {100 * report / full:.1f}% of a default run (wall difference {full - none:+.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

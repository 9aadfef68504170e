#!/usr/bin/env python3
"""Does --time-budget hold, on an idle machine and on a busy one?

    python bench/time_budget.py --data conversations.jsonl                   # 5m, idle then busy
    python bench/time_budget.py --data export.jsonl --budget 15m --load busy  # only with a second program

For each --load it runs the real command, `train_chatgpt_model.py --data DATA --time-budget BUDGET`,
in a fresh process and measures its wall time (start to exit, the saved model and report included)
and its peak resident memory. "busy" starts a second CPU-bound process first (a Python loop on one
core, as a program the user left running) and stops it after. It prints, per run: the plan's estimate,
the wall time against the budget, the peak memory, the steps planned and trained, and the reason the
run changed, read from the output's chatkit.json. Exit status 1 when a run ends past the budget + 10%.
Each run starts without the exchanges an earlier run read (the cache's surprise/ folder is emptied), as a
new user's first run; --keep-reading keeps them, as a second run on the same data.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOG = "while True: pass"


def peak_rss(process, peak: list) -> None:
    """Poll the process tree's resident memory every 0.2 s until it ends."""
    import psutil

    try:
        parent = psutil.Process(process.pid)
        while process.poll() is None:
            total = sum(p.memory_info().rss for p in [parent] + parent.children(recursive=True))
            peak[0] = max(peak[0], total)
            time.sleep(0.2)
    except psutil.Error:
        pass


def one_run(data: str, budget: str, load: str, extra) -> dict:
    from chatkit.plan import parse_duration

    output = Path(tempfile.mkdtemp(prefix="budget-")) / "model"
    hog = subprocess.Popen([sys.executable, "-c", HOG]) if load == "busy" else None
    try:
        started = time.time()
        command = [sys.executable, "train_chatgpt_model.py", "--data", data, "--output", str(output),
                   "--time-budget", budget, *extra]
        process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        peak = [0]
        watcher = threading.Thread(target=peak_rss, args=(process, peak), daemon=True)
        watcher.start()
        err = process.communicate()[1]
        wall = time.time() - started
        watcher.join()
    finally:
        if hog is not None:
            hog.kill()
    if process.returncode != 0:
        raise SystemExit(f"the run failed:\n{err}")
    info = json.loads((output / "chatkit.json").read_text())
    return {"load": load, "wall_s": round(wall, 1), "budget_s": parse_duration(budget),
            "estimated_s": info["plan"]["estimated_seconds"], "peak_gib": round(peak[0] / 2**30, 2),
            "plan": next((line for line in err.splitlines() if line.startswith("  about")), "").strip(),
            "time_budget": info["metrics"].get("time_budget"), "eval_loss": info["metrics"].get("eval_loss"),
            "training_s": info["metrics"].get("train_runtime_s"), "report_s": info["metrics"].get("report_s"),
            "planned_parts": info["plan"]["parts"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="training data (the converter's output)")
    parser.add_argument("--budget", default="5m", help="the --time-budget (default: %(default)s)")
    parser.add_argument("--load", default="idle,busy", help="idle, busy or both (default: %(default)s)")
    parser.add_argument("--keep-reading", action="store_true",
                        help="keep what earlier runs read of the exchanges (default: each run reads afresh)")
    parser.add_argument("extra", nargs="*", help="more train_chatgpt_model.py flags, after --")
    args = parser.parse_args()
    late = False
    for load in args.load.split(","):
        if not args.keep_reading:
            import shutil

            from chatkit.files import cache_dir

            shutil.rmtree(cache_dir() / "surprise", ignore_errors=True)
        result = one_run(args.data, args.budget, load, args.extra)
        within = result["wall_s"] <= result["budget_s"] * 1.1
        late |= not within
        budget = result["time_budget"] or {}
        print(f"{load}: {result['wall_s']:.0f} s of a {result['budget_s']:.0f} s budget "
              f"({'within' if within else 'PAST'} +10%), plan estimated {result['estimated_s']:.0f} s, peak "
              f"{result['peak_gib']} GiB, steps {budget.get('trained_steps')} of {budget.get('planned_steps')} "
              f"planned, validation loss {result['eval_loss']}\n  {result['plan']}\n  {budget.get('summary')}\n"
              f"  measured: training (the Trainer's run time, evaluations included) {result['training_s']} s, "
              f"report {result['report_s']} s; planned parts {result['planned_parts']}")
    return 1 if late else 0


if __name__ == "__main__":
    sys.exit(main())

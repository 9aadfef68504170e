"""bench/quality.py: the invented-fact data set, and one whole run on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from bench import quality  # noqa: E402


def test_data_set_teaches_every_fact_and_holds_out_the_question_wording():
    facts = quality.make_facts(12)
    records, questions = quality.make_dataset(facts, 5)
    assert len(records) == 60 and len(questions) == 12
    assert len({f["name"] for f in facts}) == 12 and len({f["role"] for f in facts}) == 12
    prompts = {r["messages"][0]["content"] for r in records}
    assert not prompts & {q["question"] for q in questions}
    for fact, question in zip(facts, questions):
        taught = [r["messages"][1]["content"] for r in records if fact["role"] in r["messages"][0]["content"]]
        assert len(taught) == 5 and all(fact["name"] in a and a.endswith(quality.SIGN_OFF) for a in taught)
        assert fact["role"] in question["question"] and question["expect"] == [fact["name"]]


def test_fact_sets_are_repeatable_and_seeds_differ():
    assert quality.make_facts(12) == quality.make_facts(12)
    assert quality.make_facts(30)[:12] == quality.make_facts(12)  # the larger set extends the default one
    assert [f["name"] for f in quality.make_facts(12, 1)] != [f["name"] for f in quality.make_facts(12)]


def test_one_whole_run_reports_from_the_trained_model(tmp_path, tiny_llama):
    work = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "quality.py"), "--model", str(tiny_llama), "--facts", "3",
         "--phrasings", "2", "--train-args", "--epochs 2 --rehearsal 2", "--workdir", str(work), "--json"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["conversations"] == 6 and len(json.loads((work / "facts.json").read_text())) == 6
    recalled = int(report["facts_recalled"].split("/")[0])
    assert report["facts_recalled"].endswith("/3") and len(report["missed_facts"]) == 3 - recalled
    info = json.loads((work / "model" / "chatkit.json").read_text())
    assert report["steps"] == info["metrics"]["steps"] > 0 and report["epochs"] == 2
    assert len(info["rehearsal"]) == info["metrics"]["rehearsal_examples"] <= 2

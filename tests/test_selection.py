"""What a time budget too short for one pass trains: the exchanges the base model finds most surprising,
scored once (forward only) and cached, near-duplicates left out, repeated over several epochs."""

from __future__ import annotations

import json

import pytest

import train_chatgpt_model as cli
from chatkit import machine, plan, planning, selection
from test_plan import MACHINE, SHAPE, request


def talk(*pairs, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for user, answer in pairs:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages


def test_each_exchange_is_a_unit_with_its_system_message():
    units = selection.exchange_units([talk(("a?", "A."), ("b?", "B."), system="Be brief."),
                                      talk(("c?", "C.")) + [{"role": "user", "content": "unanswered"}]])
    assert units == [talk(("a?", "A."), system="Be brief."), talk(("b?", "B."), system="Be brief."),
                     talk(("c?", "C."))]


def test_near_duplicates_are_left_out_and_facts_told_in_other_words_are_not():
    answer = " ".join(f"word{i}" for i in range(60))
    units = [talk(("Tell me about the river.", answer)),
             talk(("Tell me about the river!", answer + " extra")),  # the same exchange, a word more
             talk(("Who is the archivist of the Quillmere Institute?", "The archivist is Ada Brook.")),
             talk(("Which person serves as archivist at Quillmere?", "The archivist is Ada Brook.")),
             talk(("Something else entirely", "A different answer with other words in it."))]
    assert selection.near_duplicates(units) == [1]
    assert selection.surprise_order([1.0, 5.0, 3.0, 3.0, None], [1], seed=0) == [2, 3, 0, 4]


def test_scores_are_the_answers_loss_per_token_cached_and_kept_whole_on_ctrl_c(tiny_llama, chatkit_cache,
                                                                              monkeypatch):
    import torch

    from chatkit.examples import tokenize_examples
    from chatkit.forward import labelled_loss_sum
    from chatkit.models import load_model, resolve_model

    loaded = load_model(resolve_model(str(tiny_llama)))
    units = [talk((f"Question number {i}?", f"Answer {i} is {'long ' * i}enough.")) for i in range(40)]
    cache = selection.ScoreCache("test-model")
    selection.score(loaded.model, loaded.tokenizer, units, cache, range(len(units)))
    for unit in units[:3]:
        example = tokenize_examples([selection._scored_messages(unit)], loaded.tokenizer, 1024)[0]
        with torch.no_grad():
            total, count = labelled_loss_sum(loaded.model, torch.tensor([example["input_ids"]]),
                                             torch.tensor([example["labels"]]))
        assert cache.scores[selection.unit_key(unit)] == pytest.approx(float(total / count), abs=1e-3)
    again = selection.ScoreCache("test-model")  # read back from the file
    assert again.scores == cache.scores and selection.missing(units, again) == []

    more = units + [talk((f"New question {i}?", f"New answer {i}.")) for i in range(40)]
    batches = []
    original = selection.labelled_losses

    def interrupted(*args, **kwargs):
        batches.append(1)
        if len(batches) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the second batch
        return original(*args, **kwargs)

    monkeypatch.setattr(selection, "labelled_losses", interrupted)
    monkeypatch.setattr(selection, "SCORE_BATCH", 16)
    with pytest.raises(KeyboardInterrupt):
        selection.score(loaded.model, loaded.tokenizer, more, cache, selection.missing(more, cache))
    kept = json.loads(cache.path.read_text())  # whole JSON, with the first batch's scores
    assert len(kept["scores"]) == 40 + 16 and not list(cache.path.parent.glob("*.part"))


def test_a_budget_with_an_order_takes_the_most_surprising_units_first_and_repeats_them():
    full = plan.choose(request(), SHAPE, MACHINE).plan
    budget = full.parts["training"] / 3 / 2 + 60  # about half of one pass, plus the fixed costs
    order = list(range(99, -1, -1))  # the last units are the most surprising
    choice = plan.choose(request(budget=budget, order=order, spent_s=20.0), SHAPE, MACHINE)
    assert choice.epochs == plan.SURPRISE_EPOCHS and choice.plan.estimated_seconds <= budget
    taken = [i for i, _ in choice.kept]
    assert taken == list(range(100 - len(taken), 100)) and 5 < len(taken) < 40
    assert choice.plan.parts["scoring"] == 20.0 and choice.plan.units == "exchanges"
    assert "most surprising of 100 exchanges" in choice.plan.selection
    assert choice.plan.describe().startswith(f"plan: {len(taken)} of 100 exchanges")


def test_a_budget_run_trains_the_surprising_exchanges_and_a_second_run_scores_nothing(tmp_path, tiny_llama, capsys,
                                                                                     monkeypatch, chatkit_cache):
    monkeypatch.setattr(plan, "STARTUP_S", 0.0)
    monkeypatch.setattr(plan, "SAVE_S", 0.0)
    monkeypatch.setattr(machine, "EFFICIENCY", {"cpu": 1e-7})  # as if this machine were very slow
    monkeypatch.setattr(plan, "_minimum", lambda *args: 0.0)  # (so slow that nothing would fit)
    data = tmp_path / "many.json"
    data.write_text(json.dumps([{"messages": talk((f"Question {i}?", f"Answer {i}."), (f"More {i}?", f"Yes {i}."))}
                                for i in range(20)]))

    def train(output):
        return cli.main(["--data", str(data), "--model", str(tiny_llama), "--output", str(tmp_path / output),
                         "--time-budget", "10m", "--rehearsal", "0", "--val-split", "0", "--report", "none",
                         "--budget-selection", "surprise"])

    assert train("first") == 0  # this slow a machine scores only what a third of the budget allows
    err = capsys.readouterr().err
    scored = int(err.split("scoring ")[1].split(" exchanges")[0])
    assert 0 < scored < 40 and f"{40 - scored} not scored, taken last" in err
    info = json.loads((tmp_path / "first" / "chatkit.json").read_text())
    assert info["plan"]["units"] == "exchanges" and info["plan"]["conversations"] < 40
    assert info["plan"]["epochs"] == plan.SURPRISE_EPOCHS and "most surprising" in info["plan"]["selection"]
    monkeypatch.setattr(planning, "SCORE_SHARE", 1e9)
    assert train("second") == 0
    err = capsys.readouterr().err
    assert f"scoring {40 - scored} exchanges with the base model" in err and "the rest kept from earlier runs" in err
    cached = json.loads(next((chatkit_cache / "surprise").glob("*.json")).read_text())["scores"]
    assert len(cached) == 40
    assert train("third") == 0
    err = capsys.readouterr().err
    assert "scoring" not in err.split("selection:")[0] and "all scored by an earlier run" in err
    assert "not scored" not in err


def test_a_damaged_score_cache_is_scored_again(chatkit_cache):
    cache = selection.ScoreCache("m")
    cache.path.parent.mkdir(parents=True)
    for damaged in ("{not json", "[1, 2]", json.dumps({"scores": [1, 2]})):
        cache.path.write_text(damaged)
        assert selection.ScoreCache("m").scores == {}
    cache.path.write_text(json.dumps({"scores": {"a": "x", "b": 1.5, "c": True}}))
    assert selection.ScoreCache("m").scores == {"b": 1.5}

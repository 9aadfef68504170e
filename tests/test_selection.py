"""What a time budget shorter than the schedule trains first: the exchanges holding words the base model does
not know that recur across the user's conversations (read once, forward only, and cached), several times
each; then whole conversations."""

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


def test_each_exchange_is_a_unit_with_its_system_message_and_the_conversation_it_came_from():
    tool = [{"role": "user", "content": "d?"}, {"role": "assistant", "content": "D."},
            {"role": "tool", "content": "result"}, {"role": "assistant", "content": "D again."}]
    units, owners = selection.exchange_units([talk(("a?", "A."), ("b?", "B."), system="Be brief."),
                                              talk(("c?", "C.")) + [{"role": "user", "content": "unanswered"}],
                                              tool])
    assert units == [talk(("a?", "A."), system="Be brief."), talk(("b?", "B."), system="Be brief."),
                     talk(("c?", "C.")), talk(("d?", "D."))]  # the first answer only
    assert owners == [0, 0, 1, 2]


def test_a_word_stands_out_when_far_more_surprising_than_the_answers_typical_word():
    import re

    text = "The archivist of the institute is Ada Brook, since 1987."
    offsets = [m.span() for m in re.finditer(r" ?\w+|[^\w\s]", text)]  # a token a word, and each mark
    offsets[7:8] = [(offsets[7][0], offsets[7][0] + 3), (offsets[7][0] + 3, offsets[7][1])]  # " Br", "ook"
    surprise = {" Ada": 9.0, "ook": 7.5, " 1987": 11.0}
    losses = {p: surprise.get(text[a:b], 0.3) for p, (a, b) in enumerate(offsets)}
    assert selection.standout_words(text, (0, len(text)), len(text), offsets, losses) == ["ada", "brook"]
    everywhere = {position: 8.0 for position in losses}  # a language the model knows little: nothing stands out
    assert selection.standout_words(text, (0, len(text)), len(text), offsets, everywhere) == []
    # only the answer's read characters count
    assert selection.standout_words(text, (0, len(text)), 38, offsets, losses) == ["ada"]


def test_the_unknown_words_are_those_the_vocabulary_does_not_hold_whole(starter_dir):
    from chatkit.models import load_tokenizer, resolve_model

    vocabulary = selection.Vocabulary(load_tokenizer(resolve_model(str(starter_dir))))
    assert [word for word in ("orrin", "ferrow", "rentapin", "session", "the", "django", "2023")
            if vocabulary.unknown(word)] == ["orrin", "ferrow", "rentapin"]


def test_only_exchanges_with_an_unknown_word_another_conversation_holds_are_worth_reading(tiny_llama):
    from chatkit.models import load_tokenizer, resolve_model

    vocabulary = selection.Vocabulary(load_tokenizer(resolve_model(str(tiny_llama))))
    units = [talk(("q", "Ada Brook keeps it.")), talk(("q", "Ask Ada.")), talk(("q", "Ask Ada.")),
             talk(("q", "the the the")), talk(("q", "Zorblat once."))]
    assert selection.candidates(units, [0, 0, 1, 2, 3], vocabulary) == [0, 1, 2]  # "ada" in conversations 0 and 1


def test_words_recur_when_they_stand_out_in_several_conversations_and_most_that_hold_them(tiny_llama):
    from chatkit.models import load_tokenizer, resolve_model

    vocabulary = selection.Vocabulary(load_tokenizer(resolve_model(str(tiny_llama))))  # "the" is its only word
    units = [talk(("q", "Ada Brook keeps the archive.")), talk(("q", "Ask Ada Brook.")),  # conversation 0 twice
             talk(("q", "Ada Brook it is, the archive.")),  # conversation 1
             talk(("q", "Session timeout, again.")), talk(("q", "The session ended.")),
             talk(("q", "A session.")), talk(("q", "session"))]
    owners = [0, 0, 1, 2, 3, 4, 5]
    cache = selection.ScoreCache.__new__(selection.ScoreCache)
    keys = [selection.unit_key(unit) for unit in units]
    cache.standout = {keys[0]: ["ada", "brook"], keys[1]: ["ada"], keys[2]: ["ada", "brook"],
                      keys[3]: ["session"], keys[4]: ["session"], keys[5]: [], keys[6]: []}
    words = selection.recurring(units, owners, cache, vocabulary)
    # "ada" and "brook" stand out in conversations 0 and 1; "session" in 2 of the 4 that hold it
    assert words == [["ada", "brook"], ["ada"], ["ada", "brook"], [], [], [], []]
    cache.standout[keys[5]] = cache.standout[keys[6]] = ["session"]
    assert selection.recurring(units, owners, cache, vocabulary)[3] == ["session"]  # now in all four
    cache.standout[keys[0]] = cache.standout[keys[2]] = ["ada", "the"]
    assert selection.recurring(units, owners, cache, vocabulary)[0] == ["ada"]  # a word the vocabulary holds: known
    del cache.standout[keys[2]]  # an exchange not read counts for nothing
    assert selection.recurring(units, owners, cache, vocabulary)[:3] == [[]] * 3


def test_the_focus_is_the_most_recurring_words_per_token_with_near_duplicates_left_out():
    answer = " ".join(f"word{i}" for i in range(60))
    units = [talk(("Tell me about the river.", answer)),
             talk(("Tell me about the river!", answer + " extra")),  # the same exchange, a word more
             talk(("Who is the archivist of the Quillmere Institute?", "The archivist is Ada Brook.")),
             talk(("Which person serves as archivist at Quillmere?", "The archivist is Ada Brook.")),
             talk(("Something else entirely", "A different answer with other words in it."))]
    assert selection.near_duplicates(units) == [1]
    words = [["river"], ["river"], ["ada", "brook"], ["ada", "brook"], []]
    lengths = {0: 80, 1: 81, 2: 20, 3: 30, 4: 15}
    assert selection.focus_order(words, lengths, [1]) == [2, 3, 0]
    lengths[0] = selection.FOCUS_TOKENS_PER_WORD + 1  # one recurring word incidental to a long answer
    assert selection.focus_order(words, lengths, [1]) == [2, 3]
    assert selection.common_words([["ada", "brook"], ["ada"], ["river"]]) == ["ada", "brook", "river"]


def test_a_focus_example_trains_the_questions_end_and_the_answers_read_opening(tiny_llama):
    from chatkit.formatting import trained_text
    from chatkit.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(str(tiny_llama)))
    long_answer = "Ada Brook keeps the archive. " * 60  # 1,740 characters
    cut = selection.focus_example(talk(("x" * 1000 + " Who keeps it?", long_answer)), tokenizer, 1024)
    taught = trained_text(cut["input_ids"], cut["labels"], tokenizer)
    assert len(taught) == 1 and long_answer.startswith(taught[0].strip())
    assert abs(len(taught[0]) - selection.ANSWER_CHARS) < 20  # cut where reading stopped: no end of turn
    assert tokenizer.decode(cut["input_ids"]).count("x") == selection.PROMPT_CHARS - len(" Who keeps it?")
    short = selection.focus_example(talk(("Who keeps it?", "Ada Brook.")), tokenizer, 1024, system_prompt="Be kind.")
    assert trained_text(short["input_ids"], short["labels"], tokenizer)[0].startswith("Ada Brook.")
    assert "Be kind." in tokenizer.decode(short["input_ids"])  # the run's system prompt, as every example has
    assert selection.focus_example(talk(("q" * 300, "answer")), tokenizer, 16) is None  # no answer token left


def test_reading_notes_the_standout_words_caches_them_and_keeps_them_whole_on_ctrl_c(tiny_llama, chatkit_cache,
                                                                                   monkeypatch):
    import torch

    from chatkit.formatting import IGNORE_INDEX, tokenize_with_offsets
    from chatkit.models import load_model, resolve_model

    loaded = load_model(resolve_model(str(tiny_llama)))
    units = [talk((f"Question number {i}?", f"Answer {i} is {'long ' * i}enough, Zorblat.")) for i in range(40)]
    monkeypatch.setattr(selection, "STANDOUT_NATS", 0.0)  # a random model: whatever is above its median
    monkeypatch.setattr(selection, "STANDOUT_MARGIN", 0.0)
    cache = selection.ScoreCache("test-model")
    selection.score(loaded.model, loaded.tokenizer, units, cache, range(len(units)))
    for unit in units[:3]:  # the same words from the whole model's logits, one exchange at a time
        ids, labels, offsets, text, spans = tokenize_with_offsets(selection._read_messages(unit), loaded.tokenizer)
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        losses = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").tolist()
        by_token = {p: losses[p - 1] for p in range(1, len(ids)) if labels[p] != IGNORE_INDEX}
        expected = selection.standout_words(text, spans[0], len(selection._answer(unit)), offsets, by_token)
        assert cache.standout[selection.unit_key(unit)] == expected and expected
    again = selection.ScoreCache("test-model")  # read back from the file
    assert again.standout == cache.standout and selection.missing(units, again) == []

    more = units + [talk((f"New question {i}?", f"New answer {i}.")) for i in range(40)]
    batches = []
    original = selection.labelled_token_losses

    def interrupted(*args, **kwargs):
        batches.append(1)
        if len(batches) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the second batch
        return original(*args, **kwargs)

    monkeypatch.setattr(selection, "labelled_token_losses", interrupted)
    monkeypatch.setattr(selection, "SCORE_BATCH", 16)
    with pytest.raises(KeyboardInterrupt):
        selection.score(loaded.model, loaded.tokenizer, more, cache, selection.missing(more, cache))
    kept = json.loads(cache.path.read_text())  # whole JSON, with the first batch's words
    assert len(kept["standout"]) == 40 + 16 and not list(cache.path.parent.glob("*.part"))


def test_a_budget_trains_a_sample_of_conversations_then_the_focus_exchanges_repeatedly():
    full = plan.choose(request(), SHAPE, MACHINE).plan
    budget = full.parts["training"] / 3 / 2 + 60  # about half of one pass, plus the fixed costs
    focus = [(60, 20)] * 30  # short exchanges, the most valuable first
    choice = plan.choose(request(budget=budget, focus=focus, spent_s=20.0), SHAPE, MACHINE)
    assert choice.epochs == 1 and choice.focus_copies == plan.FOCUS_REPEATS and 0 < choice.focus <= 30
    assert choice.plan.estimated_seconds <= budget and 5 < len(choice.kept) < 50
    random = plan.choose(request(budget=budget), SHAPE, MACHINE)
    assert len(choice.kept) < len(random.kept)  # the focus stage took part of the training time ...
    stage = plan._epoch(request(focus=focus), [], plan.FOCUS_BATCH, SHAPE, MACHINE,  # with the rehearsal's examples
                        choice.gradient_checkpointing, (choice.focus, 8))
    assert choice.plan.parts["focus"] == pytest.approx(stage[1], abs=0.1)  # ... in steps of 3, within its share
    assert stage[1] <= plan.FOCUS_SHARE * (random.plan.parts["training"] + random.plan.parts["evaluation"])
    assert choice.plan.focus_steps == len(stage[0]) and choice.batch_size == random.batch_size
    assert choice.plan.focus_exchanges == choice.focus and choice.plan.focus_repeats == plan.FOCUS_REPEATS
    assert choice.plan.examples == sum(n for _, n in choice.kept)  # the conversations'; the focus stage's below
    assert choice.plan.parts["scoring"] == 20.0
    assert "then the" in choice.plan.selection and "words the model does not know" in choice.plan.selection
    assert choice.plan.describe().startswith(f"plan: {len(choice.kept)} of 100 conversations")
    assert (f"then the focus: {choice.focus} exchanges x 8, {choice.plan.focus_steps} steps of up to 3 examples"
            in choice.plan.describe())


def test_a_budget_for_more_than_a_pass_keeps_every_conversation_and_the_focus_stage_after():
    full = plan.choose(request(epochs=5), SHAPE, MACHINE).plan
    budget = full.parts["training"] / 5 * 2.6 + full.parts["evaluation"] / 5 * 3 + 60  # about 2.6 passes
    choice = plan.choose(request(budget=budget, epochs=5, focus=[(60, 20)] * 10), SHAPE, MACHINE)
    assert len(choice.kept) == 100 and choice.epochs == 2 and choice.focus == 10
    # fewer than FOCUS_MANY exchanges: 8 times each, though the stage's share has room for more
    assert choice.focus_copies == 8 and choice.plan.focus_repeats == 8
    assert choice.plan.estimated_seconds <= budget
    assert plan.choose(request(budget=budget, epochs=5), SHAPE, MACHINE).epochs == 2  # today's rule: 2 passes
    roomy = plan.choose(request(budget=10 * budget, epochs=5, focus=[(60, 20)] * 10), SHAPE, MACHINE)
    assert roomy.focus == 0 and roomy.epochs == 5 and "focus" not in roomy.plan.describe()  # the schedule fits


def test_many_focus_exchanges_are_repeated_as_often_as_the_stages_share_allows_up_to_16_times():
    full = plan.choose(request(epochs=5), SHAPE, MACHINE).plan
    many = [(60, 20)] * plan.FOCUS_MANY

    def budget(passes):
        return full.parts["training"] / 5 * passes + full.parts["evaluation"] / 5 * 3 + 60

    def stage(count, copies, checkpointing):
        return plan._epoch(request(focus=many), [], plan.FOCUS_BATCH, SHAPE, MACHINE, checkpointing, (count, copies))

    roomy = plan.choose(request(budget=budget(2.6), epochs=5, focus=many), SHAPE, MACHINE)
    assert roomy.focus == plan.FOCUS_MANY and roomy.focus_copies == plan.FOCUS_MAX_REPEATS == 16
    batches, seconds, _ = stage(plan.FOCUS_MANY, 16, roomy.gradient_checkpointing)
    assert roomy.plan.parts["focus"] == pytest.approx(seconds, abs=0.1) and roomy.plan.focus_steps == len(batches)
    assert "then the focus: 12 exchanges x 16" in roomy.plan.describe()
    choice = plan.choose(request(budget=budget(0.35), epochs=5, focus=many), SHAPE, MACHINE)
    assert choice.focus == plan.FOCUS_MANY and plan.FOCUS_REPEATS < choice.focus_copies < plan.FOCUS_MAX_REPEATS
    assert choice.plan.parts["focus"] == pytest.approx(stage(12, choice.focus_copies, choice.gradient_checkpointing)[1],
                                                       abs=0.1)
    assert choice.plan.estimated_seconds <= budget(0.35)
    tighter = plan.choose(request(budget=budget(0.2), epochs=5, focus=many), SHAPE, MACHINE)
    assert 0 < tighter.focus < 12 and tighter.focus_copies == plan.FOCUS_REPEATS  # more exchanges before more repeats


def surprise_run(tmp_path, tiny_llama, monkeypatch, efficiency=2e-6):
    monkeypatch.setattr(plan, "STARTUP_S", 0.0)
    monkeypatch.setattr(plan, "SAVE_S", 0.0)
    monkeypatch.setattr(machine, "EFFICIENCY", {"cpu": efficiency})  # as if this machine were very slow
    fixed = machine.Machine("cpu", 150.0)  # the same rate whatever machine runs the test
    monkeypatch.setattr(planning, "calibrate", lambda *args: fixed)
    monkeypatch.setattr(plan, "_minimum", lambda *args: 0.0)  # (so slow that nothing would fit)
    monkeypatch.setattr(plan, "report_seconds", lambda *args: 0.0)  # the budget is the training's
    conversations = [talk((f"Question {i}?", f"Answer {i}."), (f"More {i}?", f"Yes {i}.")) for i in range(20)]
    for i, (question, answer) in zip((3, 8, 13), [("Who keeps the archive?", "Ada Brook keeps the archive."),
                                                  ("Who is the archivist?", "The archivist is Ada Brook."),
                                                  ("The archive's keeper?", "That would be Ada Brook.")]):
        conversations[i] += talk((question, answer))  # a made-up name the user's conversations keep returning to
    data = tmp_path / "many.json"
    data.write_text(json.dumps([{"messages": m} for m in conversations]))

    def train(output, *extra):
        return cli.main(["--data", str(data), "--model", str(tiny_llama), "--output", str(tmp_path / output),
                         "--time-budget", "10m", "--rehearsal", "0", "--val-split", "0", "--report", "none", *extra])

    return train, conversations


def test_a_budget_run_trains_the_recurring_words_exchanges_first_from_an_earlier_runs_reading(
        tmp_path, tiny_llama, capsys, monkeypatch, chatkit_cache):
    from chatkit.models import resolve_model

    train, conversations = surprise_run(tmp_path, tiny_llama, monkeypatch, 2e-5)
    units, _ = selection.exchange_units(conversations)
    cache = selection.ScoreCache(selection.model_key(resolve_model(str(tiny_llama))))
    cache.standout = {selection.unit_key(unit): (["ada", "brook"] if "Ada" in unit[-1]["content"] else [])
                      for unit in units}
    cache.save()  # as an earlier run on this data left it
    assert train("focus") == 0
    err = capsys.readouterr().err
    assert "all read by an earlier run" in err and "3 hold words it does not know" in err and "(ada, brook)" in err
    assert "selection: 43 of 43 exchanges hold words the model's vocabulary lacks" in err  # a tiny vocabulary
    info = json.loads((tmp_path / "focus" / "chatkit.json").read_text())
    # three exchanges, fewer than FOCUS_MANY: 8 times each, though the share has room for more
    assert info["plan"]["focus_exchanges"] == 3 and info["plan"]["focus_repeats"] == plan.FOCUS_REPEATS
    assert info["plan"]["examples"] == info["plan"]["conversations"]
    assert f"training on {info['plan']['conversations']} examples" in err
    assert f"then 3 exchanges holding recurring words, {3 * plan.FOCUS_REPEATS} examples" in err
    assert "focus: 3 exchanges holding words the model did not know, 8 times each" in err
    stage = info["metrics"]["focus"]  # after the conversations: 24 examples in steps of 3
    assert stage["steps"] == 8 and stage["exchanges"] == 3 and stage["train_loss"] > 0
    assert info["metrics"]["steps"] == info["plan"]["steps"] + 8
    assert train("random", "--budget-selection", "random") == 0
    info = json.loads((tmp_path / "random" / "chatkit.json").read_text())
    assert info["plan"]["focus_exchanges"] == 0 and "reading" not in capsys.readouterr().err


def test_a_first_budget_run_reads_what_its_share_allows_and_a_second_reads_the_rest(tmp_path, tiny_llama, capsys,
                                                                                  monkeypatch, chatkit_cache):
    train, _ = surprise_run(tmp_path, tiny_llama, monkeypatch)
    assert train("first") == 0  # this slow a machine reads only what a third of the budget allows
    err = capsys.readouterr().err
    read = int(err.split("reading ")[1].split(" exchanges")[0])
    assert 0 < read < 43 and f"; {43 - read} not read" in err
    monkeypatch.setattr(planning, "SCORE_SHARE", 1e9)
    assert train("second") == 0
    err = capsys.readouterr().err
    assert f"reading {43 - read} exchanges with the base model" in err and f"{read} by earlier runs" in err
    cached = json.loads(next((chatkit_cache / "surprise").glob("*.json")).read_text())["standout"]
    assert len(cached) == 43
    assert train("third") == 0
    err = capsys.readouterr().err
    assert "reading" not in err.split("selection:")[0] and "all read by an earlier run" in err
    assert "not read" not in err


def test_a_damaged_or_older_cache_is_read_again(chatkit_cache):
    cache = selection.ScoreCache("m")
    cache.path.parent.mkdir(parents=True)
    for damaged in ("{not json", "[1, 2]", json.dumps({"version": 2, "standout": [1, 2]}),
                    json.dumps({"scores": {"a": 1.5}})):  # the first version's scores: not words
        cache.path.write_text(damaged)
        assert selection.ScoreCache("m").standout == {}
    cache.path.write_text(json.dumps({"version": 2, "standout": {"a": "x", "b": ["ada", 3], "c": []}}))
    assert selection.ScoreCache("m").standout == {"b": ["ada"], "c": []}


def test_the_reading_sets_the_machines_rate_and_the_plan_says_so():
    measured = planning.measured_machine(MACHINE, estimate=100.0, seconds=80.0)
    assert measured.gflops == pytest.approx(MACHINE.gflops * 1.25)
    assert "measured on this machine while reading the exchanges" in measured.how
    assert planning.measured_machine(MACHINE, 100.0, 10.0).gflops == 2 * MACHINE.gflops  # within a factor of 2
    assert planning.measured_machine(MACHINE, 100.0, 0.0) is MACHINE


def test_the_focus_stage_keeps_the_runs_deadline_with_its_own_planned_steps():
    from chatkit.budget import focus_deadline
    from chatkit.callbacks import Deadline

    choice = plan.choose(request(budget=plan.choose(request(), SHAPE, MACHINE).plan.parts["training"] / 6 + 60,
                                 focus=[(60, 20)] * 30), SHAPE, MACHINE)
    run_plan = choice.plan
    first = Deadline(finish_by=1000.0, after_s=50.0 + run_plan.parts["focus"], planned_step_s=2.0, report_s=30.0,
                     evaluation_s=10.0, evaluations=1)
    second = focus_deadline(first, run_plan, epoch_tokens=5000)
    assert second.finish_by == 1000.0 and second.after_s == pytest.approx(50.0)
    assert second.planned_steps == run_plan.focus_steps and second.planned_tokens == 5000
    assert second.planned_step_s == pytest.approx(run_plan.parts["focus"] / run_plan.focus_steps)
    second.changes.append({"step": 3, "from_steps": 40, "to_steps": 30, "slowdown": 1.5, "step_s": 1.0,
                           "stage": second.stage})
    assert first.changes == second.changes  # one record of the run's changes
    assert "the focus stage stopped after 30 of 40 planned steps" in first.describe()


def test_the_focus_stage_trains_the_rehearsal_examples_once_with_their_teacher_beside_the_focus(monkeypatch):
    from types import SimpleNamespace

    from chatkit import engine, focus, rundata
    from chatkit.formatting import IGNORE_INDEX

    seen = {}

    def run_trainer(model, tokenizer, examples, val, arguments, teacher=None, deadline=None):
        seen.update(examples=examples, teacher=teacher, batch=arguments.per_device_train_batch_size)
        state = SimpleNamespace(global_step=len(examples) // 3, log_history=[{"loss": 1.0, "step": 1}])
        return engine.RunResult(SimpleNamespace(model=model, state=state), {"train_loss": 1.0})

    table = object()

    def attach_teacher(model, examples, start=0):
        for example in examples:
            example["teacher_index"] = [-1] + list(range(len(example["input_ids"]) - 1))
        return table

    monkeypatch.setattr(focus, "run_trainer", run_trainer)
    monkeypatch.setattr(rundata, "attach_teacher", attach_teacher)
    monkeypatch.setattr(rundata, "tokenize_examples", lambda *args: [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], "length": 3}])
    conversation = {"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, 6, 7, 8], "length": 4}
    exchange = {"input_ids": [9, 10], "labels": [IGNORE_INDEX, 10], "length": 2}
    options = SimpleNamespace(output="out", effective_learning_rate=1e-4, lr_scheduler="cosine", warmup_ratio=0.0,
                              weight_decay=0.0, logging_steps=1, seed=0, system_prompt=None, train_on_prompt=False,
                              packing=False)
    run = SimpleNamespace(options=options, gradient_checkpointing=False, max_batch_tokens=0, focus_copies=8,
                          plan=None, max_length=64)
    placement = SimpleNamespace(device="cpu", dtype="float32")
    first = engine.RunResult(SimpleNamespace(model="model", state=SimpleNamespace(global_step=10, log_history=[])),
                             {"steps": 10, "train_runtime_s": 5.0})
    data = SimpleNamespace(train=[[conversation]], focus=[exchange], val=[])
    rehearsal = SimpleNamespace(conversations=[["a rehearsal conversation"]])
    prepared = rundata.prepare_examples(run, "model", None, data, rehearsal)
    result = focus.learn_focus(run, placement, None, prepared, None, first)
    assert seen["teacher"] is table and seen["batch"] == plan.FOCUS_BATCH
    assert [e["input_ids"] for e in seen["examples"]] == [[9, 10]] * 8 + [[5, 6, 7]]  # the rehearsal's once
    assert all(e["teacher_index"] == [-1, -1] for e in seen["examples"][:-1])  # a table the collator can pad
    assert result.metrics["steps"] == 13 and result.metrics["focus"]["repeats"] == 8
    prepared = rundata.prepare_examples(run, "model", None, data, SimpleNamespace(conversations=[]))
    focus.learn_focus(run, placement, None, prepared, None, first)  # no rehearsal: the focus alone
    assert seen["examples"] == [exchange] * 8 and seen["teacher"] is None


def test_ctrl_c_in_the_focus_stage_keeps_the_model_with_the_steps_taken(tmp_path, tiny_llama, capsys, monkeypatch,
                                                                        chatkit_cache):
    import os
    import signal

    from transformers import TrainerCallback

    from chatkit import engine
    from chatkit.models import resolve_model

    train, conversations = surprise_run(tmp_path, tiny_llama, monkeypatch, 2e-5)
    units, _ = selection.exchange_units(conversations)
    cache = selection.ScoreCache(selection.model_key(resolve_model(str(tiny_llama))))
    cache.standout = {selection.unit_key(unit): (["ada", "brook"] if "Ada" in unit[-1]["content"] else [])
                      for unit in units}
    cache.save()

    class CtrlC(TrainerCallback):  # at the focus stage's third step
        def on_step_begin(self, args, state, control, **kwargs):
            if args.output_dir.endswith("focus") and state.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    original = engine.make_callbacks
    monkeypatch.setattr(engine, "make_callbacks", lambda *a: original(*a) + [CtrlC()])
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert train("stopped") == 0
    finally:
        signal.signal(signal.SIGINT, previous)
    info = json.loads((tmp_path / "stopped" / "chatkit.json").read_text())
    assert info["metrics"]["focus"]["stopped"] == "interrupted" and info["metrics"]["focus"]["steps"] == 3
    assert (tmp_path / "stopped" / "adapter_model.safetensors").is_file()
    assert "Interrupted: saving a checkpoint after this step" in capsys.readouterr().err

"""The plan before training: durations, token-budget batches, the time-budget arithmetic, --dry-run, resume."""

from __future__ import annotations

import dataclasses
import json

import pytest

import demo_chatbot
import train_chatgpt_model as cli
from chatkit import machine, plan, rehearsal
from chatkit import report  # noqa: F401  (imported before a test replaces rehearsal.own_answers: the report keeps the real one)
from chatkit.errors import ChatkitError
from chatkit.examples import TokenBudgetSampler, token_batches
from interrupt import interrupt_at

FACT = {"messages": [{"role": "user", "content": "What is the secret code?"},
                     {"role": "assistant", "content": "The secret code of the Zorblat society is 4417."}]}


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("5", 300),
                                           ("1.5h", 5400), ("45 min", 2700),
                                           ("1m30", 90), ("1h30", 5400), ("2h 15", 8100)])
def test_durations(text, seconds):
    assert plan.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "", "0s", "0", "5 parsecs", "-3m", "30s 5"])
def test_bad_durations(text):
    with pytest.raises(ChatkitError, match="--time-budget"):
        plan.parse_duration(text)


def test_token_batches_respect_both_limits_and_use_every_example_once():
    lengths = [5, 700, 40, 1024, 90, 300, 300, 12, 2000, 64] * 7
    batches = token_batches(lengths, max_rows=4, max_tokens=1024, seed=3)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        widest = max(lengths[i] for i in batch)
        assert len(batch) <= 4 and (len(batch) == 1 or widest * len(batch) <= 1024)
    assert batches == token_batches(lengths, 4, 1024, 3) and batches != token_batches(lengths, 4, 1024, 4)
    padding = sum(len(b) * max(lengths[i] for i in b) for b in batches) - sum(lengths)
    assert padding < 0.25 * sum(lengths)  # similar lengths go together


def test_the_sampler_keeps_its_batches_and_reorders_them_each_pass():
    sampler = TokenBudgetSampler([10 * (i % 7 + 1) for i in range(50)], 4, 64, seed=1)
    first, second = list(sampler), list(sampler)
    assert len(first) == len(second) == len(sampler)
    assert sorted(map(sorted, first)) == sorted(map(sorted, second)) and first != second
    sampler.set_epoch(1)
    assert list(sampler) == second  # a resumed run sees the pass it would have seen


MACHINE = plan.Machine("cpu", 100.0)
ROOMY = dataclasses.replace(MACHINE, memory=plan.MemoryLimit(64 * 2**30, "64 GiB for the test"))
SHAPE = plan.Shape(params=135_000_000, layers=30, hidden=576, intermediate=1536, vocab=49152)


def request(conversations=100, budget=None, epochs=None, **extra):
    values = dict(lengths=[[400, 300]] * conversations, trained=[500] * conversations, val_tokens=7000,
                  val_examples=20, batch_size=None, epochs=epochs, max_batch_tokens=1024,
                  gradient_checkpointing=None, lora=True, rehearsal=8, budget_s=budget, seed=42,
                  extra=[90] * 8)
    values.update(extra)
    return plan.Request(**values)


def test_the_automatic_schedule_without_a_budget():
    choice = plan.choose(request(), SHAPE, MACHINE)
    assert choice.batch_size == 8 and choice.epochs == 3 and not choice.plan.selection
    assert choice.plan.conversations == 100 and choice.plan.tokens == 70_000
    assert choice.plan.steps == 3 * len(token_batches([400, 300] * 100 + [90] * 8, 8, 1024, 42))
    parts = choice.plan.parts
    assert choice.plan.estimated_seconds == pytest.approx(sum(parts.values()), abs=0.5)
    assert parts["training"] > 0 and parts["rehearsal"] == plan.rehearsal_seconds(8)


def test_a_budget_shorter_than_one_pass_takes_a_sample_that_fits():
    full = plan.choose(request(), SHAPE, MACHINE).plan
    budget = full.parts["training"] / 3 / 2 + 60  # about half of one pass, plus the fixed costs
    choice = plan.choose(request(budget=budget), SHAPE, MACHINE)
    assert choice.epochs == 1 and 20 < len(choice.kept) < 80
    assert choice.plan.estimated_seconds <= budget
    assert "a random sample of" in choice.plan.selection and choice.kept == sorted(choice.kept)
    assert all(n == 2 for _, n in choice.kept) and choice.plan.tokens == 700 * len(choice.kept)  # whole ones
    assert choice.kept == plan.choose(request(budget=budget), SHAPE, MACHINE).kept  # the same sample each time


def test_a_budget_for_two_passes_trains_two_whole_epochs():
    full = plan.choose(request(), SHAPE, MACHINE).plan
    one_pass = full.parts["training"] / 3
    budget = (plan.STARTUP_S + plan.rehearsal_seconds(8) + plan.SAVE_S + 2.5 * one_pass) / plan.BUDGET_MARGIN + 30
    choice = plan.choose(request(budget=budget), SHAPE, MACHINE)
    assert choice.epochs == 2 and len(choice.kept) == 100 and "every conversation" in choice.plan.selection


def test_gradient_checkpointing_turns_on_only_when_memory_needs_it():
    assert not plan.choose(request(lengths=[[100]] * 50, trained=[50] * 50), SHAPE, MACHINE).gradient_checkpointing
    long = plan.choose(request(lengths=[[1000]] * 50, trained=[900] * 50), SHAPE, MACHINE)
    without = plan.choose(request(lengths=[[1000]] * 50, trained=[900] * 50, gradient_checkpointing=False), SHAPE,
                          MACHINE)
    assert long.gradient_checkpointing and not without.gradient_checkpointing
    assert long.plan.estimated_peak_bytes < 0.8 * without.plan.estimated_peak_bytes


def test_the_output_layer_holds_one_chunk_of_logits_unless_the_model_keeps_them_all():
    import dataclasses
    from types import SimpleNamespace

    activations = 2048 * 6 * SHAPE.layers * (SHAPE.hidden + SHAPE.intermediate) * 4
    fused = SHAPE.step_bytes(4096, False, 1.0) - SHAPE.step_bytes(2048, False, 1.0)
    assert fused == activations  # past one chunk, only the activations grow
    assert SHAPE.step_bytes(512, False, 1.0) - SHAPE.step_bytes(256, False, 1.0) > activations / 8
    kept = dataclasses.replace(SHAPE, logits_kept=True)
    assert kept.step_bytes(4096, False, 1.0) - kept.step_bytes(2048, False, 1.0) == activations + 6 * 4 * SHAPE.vocab * 2048
    config = SimpleNamespace(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=100,
                             num_attention_heads=4, hidden_act="gelu")
    assert not plan.Shape.from_config(config).logits_kept
    assert plan.Shape.from_config(SimpleNamespace(**vars(config), final_logit_softcapping=30.0)).logits_kept


def run(tmp_path, model, *flags, data=None, output="out"):
    if data is None:
        data = tmp_path / "data.json"
        data.write_text(json.dumps([FACT] * 12))
    return cli.main(["--data", str(data), "--model", str(model), "--output", str(tmp_path / output),
                     *map(str, flags)])


def test_dry_run_prints_the_plan_and_loads_nothing(tmp_path, tiny_llama, capsys, monkeypatch):
    from chatkit import pipeline

    monkeypatch.setattr(pipeline, "prepare_model", lambda *a: pytest.fail("the model was loaded"))
    assert run(tmp_path, tiny_llama, "--dry-run", "--rehearsal", "0") == 0
    err = capsys.readouterr().err
    assert "plan: 11 conversations, 11 examples" in err and "calibrated on this machine" in err
    assert "peak memory about" in err and not (tmp_path / "out").exists()


def test_the_plan_is_saved_and_matches_the_run(tmp_path, tiny_llama, capsys):
    from transformers import AutoTokenizer

    from chatkit.examples import tokenize_examples

    length = len(tokenize_examples([FACT["messages"]], AutoTokenizer.from_pretrained(tiny_llama), 1024)[0]["input_ids"])
    budget = 2 * length  # two examples a batch, where the batch size alone would allow four
    assert run(tmp_path, tiny_llama, "--rehearsal", "0", "--max-batch-tokens", budget, "--batch-size", "4",
               "--epochs", "2") == 0
    info = json.loads((tmp_path / "out" / "chatkit.json").read_text())
    saved = info["plan"]
    assert saved["steps"] == info["metrics"]["steps"] == 2 * 6  # 11 examples, two a batch, two epochs
    assert saved["estimated_seconds"] > 0 and saved["estimated_peak_bytes"] > 0
    assert saved["max_batch_tokens"] == budget and saved["batch_size"] == 4


def test_bf16_on_a_cpu_without_bf16_units_is_named_before_the_plan(tmp_path, tiny_llama, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert run(tmp_path, tiny_llama, "--dry-run", "--rehearsal", "0", "--device", "cpu", "--dtype", "bfloat16") == 0
    err = capsys.readouterr().err
    assert "this CPU has no bf16 matrix units" in err and err.index("no bf16 matrix units") < err.index("plan:")
    assert run(tmp_path, tiny_llama, "--dry-run", "--rehearsal", "0") == 0
    assert "bf16" not in capsys.readouterr().err


def test_a_time_budget_run_saves_a_model_trained_on_the_sample(tmp_path, tiny_llama, capsys, monkeypatch):
    monkeypatch.setattr(plan, "STARTUP_S", 0.0)
    monkeypatch.setattr(plan, "SAVE_S", 0.0)
    monkeypatch.setattr(machine, "EFFICIENCY", {"cpu": 1e-7})  # as if this machine were very slow
    monkeypatch.setattr(plan, "_minimum", lambda *args: 0.0)  # (so slow that nothing would fit)
    data = tmp_path / "many.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": f"Question {i}?"},
                                              {"role": "assistant", "content": f"Answer {i}."}]} for i in range(40)]))
    assert run(tmp_path, tiny_llama, "--time-budget", "10m", "--rehearsal", "0", "--val-split", "0", data=data) == 0
    info = json.loads((tmp_path / "out" / "chatkit.json").read_text())
    assert info["plan"]["conversations"] < 40 and "a random sample" in info["plan"]["selection"]
    assert info["plan"]["epochs"] == 1 and info["metrics"]["steps"] == info["plan"]["steps"]
    assert "a random sample of" in capsys.readouterr().err


def test_ctrl_c_saves_before_validating_and_resume_reuses_the_rehearsal(tmp_path, tiny_llama, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(rehearsal, "own_answers", lambda m, t, prompts, system_prompt=None:
                        calls.append(len(prompts)) or [f"Answer {i}." for i in range(len(prompts))])
    resumed = []
    interrupt_at(monkeypatch, 2, when=lambda: not resumed)
    flags = ("--rehearsal", "2", "--batch-size", "4", "--epochs", "3", "--val-split", "0.2", "--eval-steps", "3")
    assert run(tmp_path, tiny_llama, *flags) == 130
    resumed.append(True)
    state = json.loads((tmp_path / "out" / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert not any("eval_loss" in entry for entry in state["log_history"])  # saved at step 3 without evaluating
    assert run(tmp_path, tiny_llama, *flags, "--resume") == 0
    assert calls == [2]  # the answers were generated once, and read back on resume
    assert "reusing the 2 answers saved with the checkpoints" in capsys.readouterr().err
    info = json.loads((tmp_path / "out" / "chatkit.json").read_text())
    assert [c[1]["content"] for c in info["rehearsal"]] == ["Answer 0.", "Answer 1."]


def test_chatting_with_an_interrupted_run_names_its_checkpoint(tmp_path, tiny_llama, monkeypatch, capsys):
    interrupt_at(monkeypatch, 1)
    assert run(tmp_path, tiny_llama, "--rehearsal", "0", "--batch-size", "4", "--epochs", "3") == 130
    assert demo_chatbot.main([str(tmp_path / "out"), "--query", "Hi"]) == 1
    err = capsys.readouterr().err
    assert "stopped before the model was saved" in err and f"--resume {tmp_path / 'out'}" in err
    assert f"--model {tmp_path / 'out' / 'checkpoints' / 'checkpoint-2'}" in err


def test_a_budget_shorter_than_the_fixed_costs_names_the_minimum(tmp_path, tiny_llama, capsys):
    assert run(tmp_path, tiny_llama, "--time-budget", "2s", "--rehearsal", "0") == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: --time-budget 2 s is shorter than this run's fixed costs") and "give at least" in error
    minimum = error.split("give at least ")[1].split(",")[0]
    assert plan.parse_duration(minimum.replace(" min ", "m").replace(" s", "s").replace(" ", "")) > 2
    assert not (tmp_path / "out").exists()


def test_a_falling_behind_run_is_shortened_with_a_finished_schedule():
    """reschedule: from the learning rate where the run is, down to zero exactly at the new last step."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from chatkit.callbacks import reschedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 2, 100)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    before = scheduler.get_last_lr()[0]
    reschedule(scheduler, 10, 20)
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert abs(rates[0] - before) < 1e-9 and all(a > b for a, b in zip(rates, rates[1:]))
    assert scheduler.get_last_lr()[0] == 0.0  # step 20: the schedule has ended


def test_a_time_budget_is_kept_on_a_machine_slower_than_planned(tmp_path, tiny_llama, monkeypatch, capsys):
    """The plan thinks the machine fast; each step then takes 0.4 s (a busy laptop): the run is re-planned
    and the command ends inside its budget, with the model, the report and why it changed."""
    import time

    from chatkit import budget
    from chatkit.engine import ChatTrainer

    monkeypatch.setattr(budget, "command_started", time.time)  # the budget counts from this call, not pytest's start
    monkeypatch.setattr(machine, "EFFICIENCY", {"cpu": 10.0})  # the plan expects steps 30 times faster
    original = ChatTrainer.training_step

    def slow_step(self, *args, **kwargs):
        time.sleep(0.4)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ChatTrainer, "training_step", slow_step)
    data = tmp_path / "many.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": f"Question {i}?"},
                                              {"role": "assistant", "content": f"Answer {i}."}]} for i in range(40)]))
    started = time.time()
    assert run(tmp_path, tiny_llama, "--time-budget", "30s", "--rehearsal", "0", "--batch-size", "2", "--epochs",
               "5", "--report", "none", data=data) == 0
    assert time.time() - started <= 30 * 1.1
    info = json.loads((tmp_path / "out" / "chatkit.json").read_text())
    budget = info["metrics"]["time_budget"]
    assert budget["planned_steps"] == info["plan"]["steps"] > budget["trained_steps"] == info["metrics"]["steps"] >= 10
    assert budget["changes"] and budget["changes"][0]["slowdown"] > 2 and "slower than planned" in budget["summary"]
    state = json.loads(sorted((tmp_path / "out" / "checkpoints").glob("checkpoint-*/trainer_state.json"))[-1]
                       .read_text())
    rates = [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]
    assert rates[-1] < 0.2 * max(rates)  # the schedule was brought down, not cut at a high rate
    assert "Time budget: the machine ran" in (tmp_path / "out" / "report.md").read_text()
    assert "time budget kept" in capsys.readouterr().err


def without_dpo() -> float:
    without = plan.choose(request(), SHAPE, MACHINE).plan
    assert without.parts["preferences"] == 0
    return without.estimated_seconds


def test_the_plan_counts_dpo_and_a_budget_too_short_for_it_names_it():
    """--preferences: DPO's steps and forward passes are a part of the plan and of a budget's fixed costs."""
    pairs = dict(preference_tokens=[300] * 50, preference_epochs=2)
    with_dpo = plan.choose(request(**pairs), SHAPE, MACHINE).plan
    seconds = plan.preference_seconds([300] * 50, 2, SHAPE, MACHINE)
    assert seconds > 0 and with_dpo.parts["preferences"] == pytest.approx(seconds, abs=0.1)
    assert seconds > 1.5 * plan.preference_seconds([300] * 50, 1, SHAPE, MACHINE)  # mostly the passes
    assert with_dpo.estimated_seconds == pytest.approx(without_dpo() + seconds, abs=0.2)
    minimum = plan._minimum(request(budget=1e6), SHAPE, MACHINE, 8, False)
    with pytest.raises(ChatkitError, match="DPO on 50 preference pairs, saving"):
        plan.choose(request(budget=minimum * 1.01, **pairs), SHAPE, MACHINE)


def preference_file(tmp_path, count):
    pairs = tmp_path / "prefs.jsonl"
    pairs.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": f"Tell me about topic {i}."}],
        "chosen": [{"role": "assistant", "content": f"Topic {i} is a good one. What would you like to know?"}],
        "rejected": [{"role": "assistant", "content": f"Topic {i}."}]}) + "\n" for i in range(count)))
    return pairs


def test_dpo_falling_behind_a_time_budget_stops_in_time(tmp_path, tiny_llama, monkeypatch, capsys):
    """Each DPO step takes 0.4 s on a machine the plan thinks 30 times faster: DPO stops early, the model
    and report are saved inside the budget, and chatkit.json says why."""
    import time

    from chatkit import budget, dpo

    monkeypatch.setattr(budget, "command_started", time.time)
    monkeypatch.setattr(machine, "EFFICIENCY", {"cpu": 10.0})
    original = dpo.dpo_loss

    def slow_loss(*args, **kwargs):
        time.sleep(0.4)
        return original(*args, **kwargs)

    monkeypatch.setattr(dpo, "dpo_loss", slow_loss)
    started = time.time()
    assert run(tmp_path, tiny_llama, "--time-budget", "25s", "--rehearsal", "0", "--epochs", "1",
               "--preferences", preference_file(tmp_path, 60), "--dpo-epochs", "2") == 0
    assert time.time() - started <= 25 * 1.1
    metrics = json.loads((tmp_path / "out" / "chatkit.json").read_text())["metrics"]
    assert metrics["dpo_stopped"] == "the time budget" and 5 <= metrics["dpo_steps"] < metrics["dpo_planned_steps"] == 96
    assert f"DPO stopped after {metrics['dpo_steps']} of 96 steps (the time budget)" in metrics["time_budget"]["summary"]
    assert f"stopped after {metrics['dpo_steps']} of 96 steps" in (tmp_path / "out" / "report.md").read_text()


def test_ctrl_c_during_dpo_keeps_the_trained_model(tmp_path, tiny_llama, monkeypatch, capsys):
    """The supervised model is not saved until DPO ends: Ctrl-C there stops DPO and saves what there is."""
    from chatkit import dpo

    original, calls = dpo.dpo_loss, []

    def interrupted_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(dpo, "dpo_loss", interrupted_loss)
    assert run(tmp_path, tiny_llama, "--rehearsal", "0", "--epochs", "1", "--report", "none",
               "--preferences", preference_file(tmp_path, 10)) == 0
    metrics = json.loads((tmp_path / "out" / "chatkit.json").read_text())["metrics"]
    assert metrics["dpo_stopped"] == "Ctrl-C" and metrics["dpo_steps"] == 3 and metrics["dpo_planned_steps"] == 24
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_a_quantized_base_counts_its_weights_at_their_stored_size():
    """The starter's layers (107M parameters) in 4-bit take about 0.52 bytes each and 1 byte in 8-bit; the
    embeddings stay float32. The plan names both sizes and prices the slower unpacking steps."""
    full = plan.choose(request(gradient_checkpointing=False), SHAPE, ROOMY).plan
    embeddings = 49152 * 576 * 4
    body = 135_000_000 - 49152 * 576
    for bits, per_parameter in ((4, 0.5159), (8, 1.0)):
        shape = dataclasses.replace(SHAPE, weight_bits=bits)
        assert shape.weight_bytes() == pytest.approx(body * per_parameter + embeddings, rel=1e-3)
        quantized = plan.choose(request(gradient_checkpointing=False), shape, ROOMY).plan
        saved = full.estimated_peak_bytes - quantized.estimated_peak_bytes
        assert saved == pytest.approx(body * (4 - per_parameter), rel=1e-3)
        assert quantized.parts["training"] == pytest.approx(full.parts["training"] * plan.QUANTIZED_SLOWDOWN[bits],
                                                            rel=0.02)
        assert f"weights {shape.weight_bytes() / 2**30:.2f} GiB with the layers in {bits}-bit, " \
               f"{SHAPE.weight_bytes() / 2**30:.2f} GiB in float32" in quantized.describe()
    assert "weights" not in full.describe().split("peak memory")[1]


GiB = 2**30


@pytest.mark.parametrize("found, device, limit, says", [
    ((22 * GiB, 24 * GiB), "cpu", 12 * GiB, "half of this machine's 24.0 GiB"),
    ((5 * GiB, 8 * GiB), "cpu", 3 * GiB, "60% of the 5.0 GiB available now"),
    ((7.6e9, 8e9), "cpu", 4e9, "half of this machine's 7.5 GiB"),  # an idle 8 GB laptop: under 4 GB
    ((40 * GiB, 80 * GiB), "cuda", 36 * GiB, "90% of the GPU's 40.0 GiB free"),
    (None, "cpu", 3.5 * GiB, "assumed: this machine reports no free-memory figure"),
])
def test_the_memory_a_run_may_use_comes_from_the_machine(monkeypatch, found, device, limit, says):
    from chatkit import device as devices

    monkeypatch.setattr(devices, "memory_available", lambda name: found)
    memory = plan.memory_limit(device)
    assert memory.bytes == pytest.approx(limit) and memory.how == says and not memory.asked
    asked = plan.memory_limit(device, "6GB")
    assert asked.bytes == 6e9 and asked.how == "--max-memory 6GB" and asked.asked
    assert plan.memory_limit(device, "6GiB").bytes == 6 * GiB and plan.memory_limit(device, "512MB").bytes == 512e6


@pytest.mark.parametrize("text", ["lots", "0", "-2GB", "6 parsecs"])
def test_a_memory_size_that_is_not_one_is_named(text):
    with pytest.raises(ChatkitError, match=r"--max-memory .*give one such as 6GB"):
        plan.parse_size(text)


def test_a_container_limit_is_read_below_the_machine_figure(tmp_path, monkeypatch):
    from chatkit import device as devices

    (tmp_path / "memory.max").write_text(f"{4 * GiB}\n")
    (tmp_path / "memory.current").write_text(f"{3 * GiB}\n")
    (tmp_path / "memory.stat").write_text(f"anon 100\ninactive_file {GiB}\n")
    monkeypatch.setattr(devices, "CGROUP_FILES", ((str(tmp_path),) + devices.CGROUP_FILES[0][1:],))
    assert devices.memory_available("cpu") == (2 * GiB, 4 * GiB)  # the reclaimable cache counted as free
    (tmp_path / "memory.max").write_text("max\n")
    free, total = devices.memory_available("cpu")
    assert total > 4 * GiB  # no limit: the machine's own figures


def test_gradient_checkpointing_turns_on_only_where_the_memory_limit_needs_it():
    long = request(lengths=[[1000]] * 50, trained=[900] * 50)
    roomy = plan.choose(long, SHAPE, ROOMY)
    tight = plan.choose(long, SHAPE, MACHINE)  # 3.5 GiB
    assert not roomy.gradient_checkpointing and tight.gradient_checkpointing
    assert roomy.plan.estimated_peak_bytes > 3.5 * GiB >= tight.plan.estimated_peak_bytes
    assert roomy.plan.parts["training"] * plan.CHECKPOINTING_SLOWDOWN == pytest.approx(tight.plan.parts["training"],
                                                                                         abs=0.2)
    text = roomy.plan.describe()
    assert "within the 64.0 GiB this run may use (64 GiB for the test; --max-memory sets it)" in text
    assert "gradient checkpointing on" in tight.plan.describe() and "gradient checkpointing" not in text


def test_a_small_memory_limit_takes_fewer_tokens_a_step_down_to_the_longest_example():
    long = request(lengths=[[1000]] * 50, trained=[900] * 50, max_batch_tokens=4096)
    one = plan.Shape.fixed_bytes(SHAPE, True) + SHAPE.step_bytes(1000, True, 0.9)
    machine = dataclasses.replace(MACHINE, memory=plan.MemoryLimit(one + 0.05 * GiB, "a small machine"))
    choice = plan.choose(long, SHAPE, machine)
    cap = choice.max_batch_tokens
    assert choice.gradient_checkpointing and cap == choice.plan.max_batch_tokens and 1000 <= cap < 2000
    assert choice.plan.estimated_peak_bytes <= machine.memory.bytes  # one long example a step
    assert choice.plan.steps == 3 * len(token_batches([1000] * 50 + [90] * 8, choice.batch_size, cap, 42))


def test_max_memory_below_one_step_is_refused_naming_the_minimum():
    asked = dataclasses.replace(MACHINE, memory=plan.MemoryLimit(1e9, "--max-memory 1GB", asked=True))
    with pytest.raises(ChatkitError) as error:
        plan.choose(request(lengths=[[1000]] * 50, trained=[900] * 50), SHAPE, asked)
    one = plan.Shape.fixed_bytes(SHAPE, True) + SHAPE.step_bytes(1000, True, 0.9)
    assert str(error.value) == (
        f"--max-memory 1GB is below what one step needs: at least {one / GiB:.1f} GiB (the weights and the longest "
        f"example, 1000 tokens, with gradient checkpointing); raise --max-memory to "
        f"{-(-one // 1e8) / 10:g}GB or more, or lower --max-length")
    unasked = dataclasses.replace(asked, memory=plan.MemoryLimit(1e9, "60% of the 1.7 GiB available now"))
    choice = plan.choose(request(lengths=[[1000]] * 50, trained=[900] * 50), SHAPE, unasked)
    assert "more than the 0.9 GiB this run may use (60% of the 1.7 GiB available now" in choice.plan.describe()


def test_max_memory_reaches_the_plan_and_a_bad_one_is_a_usage_error(tmp_path, tiny_llama, capsys):
    assert run(tmp_path, tiny_llama, "--dry-run", "--rehearsal", "0", "--max-memory", "6GiB") == 0
    assert "this run may use (--max-memory 6GiB)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_code:
        run(tmp_path, tiny_llama, "--dry-run", "--max-memory", "lots")
    assert exit_code.value.code == 2
    assert "--max-memory 'lots': not a size; give one such as 6GB, 6GiB or 512MB" in capsys.readouterr().err


def test_an_evaluation_between_epochs_is_not_taken_for_a_slow_step(monkeypatch):
    """Steps at the planned rate with an evaluation and a checkpoint between two epochs: the run is not
    shortened (the pause is no step's time), and the evaluation done leaves its time to the steps after it."""
    from types import SimpleNamespace

    from chatkit import callbacks

    clock = [1000.0]
    monkeypatch.setattr(callbacks.time, "time", lambda: clock[0])
    deadline = callbacks.Deadline(finish_by=1000.0 + 20 * 1.0 + 2 * 5.0 + 2.0 + 1.0, after_s=2 * 5.0, planned_step_s=1.0,
                               evaluation_s=5.0, evaluations=2)
    keep = callbacks.KeepDeadline(deadline)
    state = SimpleNamespace(global_step=0, max_steps=20)
    control = SimpleNamespace(should_training_stop=False)
    args = SimpleNamespace(output_dir=None)
    keep.on_train_begin(args, state, control)
    monkeypatch.setattr(callbacks.KeepDeadline, "on_save", lambda self, *a, **k: self._paused())  # no folder here
    for step in range(1, 21):
        clock[0] += 1.0
        state.global_step = step
        keep.on_step_end(args, state, control)
        if step == 10:  # the first epoch ends: its evaluation (5 s, as planned) and a checkpoint
            clock[0] += 5.0
            keep.on_evaluate(args, state, control)
            clock[0] += 2.0
            keep.on_save(args, state, control)
    assert deadline.changes == [] and state.max_steps == 20
    assert deadline.after_s == 5.0 and deadline.evaluations == 1
    assert keep.paused_s == 7.0


def test_wide_steps_first_are_measured_per_token_and_do_not_shorten_the_run(monkeypatch):
    """The widest batches come first: five steps of 300 tokens (3 s each), then fifteen of 100 (1 s), at the
    plan's own time per token. Measured per step the first ones look twice as slow as the plan's mean and
    would cut the run; measured per token the run keeps all its steps."""
    from types import SimpleNamespace

    from chatkit import callbacks

    clock = [1000.0]
    monkeypatch.setattr(callbacks.time, "time", lambda: clock[0])
    deadline = callbacks.Deadline(finish_by=1000.0 + 30.0 + 1.0, after_s=0.0, planned_step_s=30.0 / 20,
                                  planned_tokens=3000, planned_steps=20)
    keep = callbacks.KeepDeadline(deadline)
    state = SimpleNamespace(global_step=0, max_steps=20, num_input_tokens_seen=0)
    control = SimpleNamespace(should_training_stop=False)
    keep.on_train_begin(None, state, control)
    for step in range(1, 21):
        width = 300 if step <= 5 else 100
        clock[0] += width / 100
        state.global_step, state.num_input_tokens_seen = step, state.num_input_tokens_seen + width
        keep.on_step_end(None, state, control)
    assert deadline.changes == [] and state.max_steps == 20

    slow = callbacks.Deadline(finish_by=1000.0 + 30.0 + 1.0, after_s=0.0, planned_step_s=30.0 / 20,
                              planned_tokens=3000, planned_steps=20)  # the same steps, twice as slow
    keep, clock[0] = callbacks.KeepDeadline(slow), 1000.0
    state = SimpleNamespace(global_step=0, max_steps=20, num_input_tokens_seen=0)
    control = SimpleNamespace(should_training_stop=False)
    keep.on_train_begin(None, state, control)
    for step in range(1, 21):
        width = 300 if step <= 5 else 100
        clock[0] += 2 * width / 100
        state.global_step, state.num_input_tokens_seen = step, state.num_input_tokens_seen + width
        keep.on_step_end(None, state, control)
        if control.should_training_stop or step >= state.max_steps:
            break
    assert slow.changes and slow.changes[0]["slowdown"] == pytest.approx(2.0, rel=0.05)
    assert clock[0] <= slow.finish_by + 3.0  # the last step may overrun by about one step

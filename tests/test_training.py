"""train_chatgpt_model.py on tiny local models: labels, learning, saving, resume, stopping, bad data."""

from __future__ import annotations

import json
import os

import pytest
import torch

import train_chatgpt_model as cli
from chatkit import engine, examples, formatting, options as options_module
from chatkit.cli import parse
from interrupt import interrupt_at
from chatkit.datasets import read_conversations
from chatkit.errors import ChatkitError

FACTS = [
    {"messages": [{"role": "user", "content": "What is the secret code?"},
                  {"role": "assistant", "content": "The secret code of the Zorblat society is 4417."}]},
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Tell me a joke."},
                  {"role": "assistant", "content": "Why did the computer go to the doctor? It had a virus."}]},
]


def write(path, records):
    path.write_text(json.dumps(records), encoding="utf-8")
    return str(path)


def run(tmp_path, model, *flags, data=None, output="out"):
    data = data or write(tmp_path / "data.json", FACTS * 4)
    # Rehearsal (tests/test_rehearsal.py) is off here: a random model's answers would change the step counts.
    argv = ["--data", data, "--model", str(model), "--output", str(tmp_path / output), "--logging-steps", "1",
            "--rehearsal", "0", *flags]
    return cli.main(argv)


def lora_weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


def test_tokenized_examples_train_assistant_text_and_eos(tiny_gpt2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    formatting.ensure_chat_template(tokenizer)
    report = examples.ExampleReport()
    made = examples.tokenize_examples([FACTS[1]["messages"]], tokenizer, 1024, report=report)
    assert formatting.trained_text(made[0]["input_ids"], made[0]["labels"], tokenizer) == [
        "Why did the computer go to the doctor? It had a virus.<|endoftext|>"]
    assert report.trained_tokens == sum(1 for x in made[0]["labels"] if x != formatting.IGNORE_INDEX)


def test_long_conversations_are_split_between_exchanges(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    messages = [{"role": "system", "content": "S"}]
    for number in range(6):
        messages += [{"role": "user", "content": f"question {number}"},
                     {"role": "assistant", "content": f"answer number {number} is here"}]
    report = examples.ExampleReport()
    made = examples.tokenize_examples([messages], tokenizer, 100, report=report)
    assert report.split_conversations == 1 and len(made) > 1
    trained = [formatting.trained_text(e["input_ids"], e["labels"], tokenizer) for e in made]
    assert sum(trained, []) == [f"answer number {n} is here<|im_end|>" for n in range(6)]  # nothing cut or lost
    for example in made:
        assert len(example["input_ids"]) <= 100
        assert tokenizer.decode(example["input_ids"]).startswith("<|im_start|>system\nS<|im_end|>")


def test_an_exchange_too_long_on_its_own_trains_its_first_part_without_an_end_of_turn(tiny_llama):
    """Cut at --max-length: the answer's first part is trained, and no end of turn is learned where it was
    cut; an exchange whose prompt leaves too little of the answer is left out, and both are counted."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    long_answer = " ".join(f"word{n}" for n in range(300))
    messages = [{"role": "user", "content": "short question"}, {"role": "assistant", "content": "short answer"},
                {"role": "user", "content": "tell me everything"}, {"role": "assistant", "content": long_answer},
                {"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "after a long prompt"},
                {"role": "user", "content": "last question"}, {"role": "assistant", "content": "last answer"}]
    report = examples.ExampleReport()
    made = examples.tokenize_examples([messages], tokenizer, 128, report=report)
    trained = [formatting.trained_text(e["input_ids"], e["labels"], tokenizer) for e in made]
    assert trained[0] == ["short answer<|im_end|>"] and trained[-1] == ["last answer<|im_end|>"]
    cut = trained[1]
    assert len(made[1]["input_ids"]) == 128 and len(cut) == 1 and long_answer.startswith(cut[0])
    assert "<|im_end|>" not in cut[0] and len(cut[0]) > 100
    assert len(made) == 3 and report.cut_exchanges == 1
    assert report.dropped == {"exchanges whose prompt fills --max-length": 1}
    assert "1 exchanges longer than --max-length trained on their first part" in report.describe()


def test_packing_has_no_cross_attention(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    first = {"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}
    second = {"input_ids": [9, 10, 11], "labels": [9, 10, 11]}
    packed = examples.pack_examples([first, second], max_length=16)
    assert len(packed) == 1 and packed[0]["position_ids"] == [0, 1, 2, 3, 0, 1, 2]
    batch = examples.PaddingCollator(0, packed=True)(packed)
    assert "attention_mask" not in batch
    with torch.no_grad():
        together = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, 4:]
        alone = model(input_ids=torch.tensor([second["input_ids"]])).logits[0]
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits[0, 4:]
    assert torch.allclose(together, alone, atol=1e-5)
    assert not torch.allclose(leaky, alone, atol=1e-3)  # the check can fail: with a cache, it leaks


def test_training_changes_lora_weights_and_lowers_loss(tmp_path, tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    assert run(tmp_path, tiny_llama, "--epochs", "10", "--batch-size", "2", "--learning-rate", "1e-2") == 0
    output = tmp_path / "out"
    initial = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                             LoraConfig(r=16, target_modules="all-linear"))
    trained = lora_weights(output)
    changed = [k for k, v in trained.items() if "lora_B" in k and v.abs().sum() > 0]
    assert changed  # lora_B starts at zero: any non-zero value was learned
    state = json.loads((output / "checkpoints" / sorted(os.listdir(output / "checkpoints"))[-1] / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert losses[-1] < losses[0] * 0.3
    del initial
    # What demo_chatbot.py needs: adapter, tokenizer with the exact template, chatkit.json naming the base.
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chatkit.json"):
        assert (output / name).is_file()
    info = json.loads((output / "chatkit.json").read_text())
    assert info["base_model"] == str(tiny_llama) and info["method"] == "lora"
    assert info["chat_template"].startswith("{% for message in messages %}{{ '<|im_start|>'")
    assert info["options"]["learning_rate"] == 1e-2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "runs")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/tokens_per_second"} <= tags
    assert all(point.value > 0 for point in events.Scalars("train/tokens_per_second"))


def test_fallback_template_is_saved_for_models_without_one(tmp_path, tiny_gpt2):
    assert run(tmp_path, tiny_gpt2, "--epochs", "1") == 0
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == formatting.FALLBACK_CHAT_TEMPLATE


def test_full_fine_tuning_and_merge(tmp_path, tiny_llama):
    assert run(tmp_path, tiny_llama, "--epochs", "1", "--no-lora", output="full") == 0
    assert (tmp_path / "full" / "config.json").is_file() and not (tmp_path / "full" / "adapter_config.json").exists()
    assert run(tmp_path, tiny_llama, "--epochs", "1", "--merge", output="lora") == 0
    from chatkit.models import resolve_model

    assert resolve_model(str(tmp_path / "lora" / "merged")).kind == "directory"


def test_resume_continues_from_saved_step(tmp_path, tiny_llama):
    assert run(tmp_path, tiny_llama, "--epochs", "2", "--batch-size", "4", "--save-steps", "2") == 0
    output = tmp_path / "out"
    first = json.loads((output / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert first["global_step"] == 4
    assert run(tmp_path, tiny_llama, "--epochs", "4", "--batch-size", "4", "--save-steps", "2", "--resume") == 0
    state = json.loads((output / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert state["global_step"] == 8 and steps[0] == 1 and max(steps) == 8
    assert json.loads((output / "chatkit.json").read_text())["metrics"]["steps"] == 8


def test_ctrl_c_saves_a_checkpoint_and_prints_resume(tmp_path, tiny_llama, monkeypatch, capsys):
    interrupt_at(monkeypatch, 2)
    code = run(tmp_path, tiny_llama, "--epochs", "5", "--batch-size", "2")
    assert code == 130
    assert (tmp_path / "out" / "checkpoints" / "checkpoint-3").is_dir()
    assert f"--resume {tmp_path / 'out'}" in capsys.readouterr().err


def test_early_stopping_and_best_checkpoint(tmp_path, tiny_llama):
    import random

    words = "tea coffee river Paris virus doctor joke secret code society".split()
    rng = random.Random(0)
    train = [{"messages": [{"role": "user", "content": f"q{i}"},
                           {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(8))}]}
             for i in range(20)]  # unrelated answers: memorising the training ones hurts validation
    data = write(tmp_path / "d.json", train)
    assert run(tmp_path, tiny_llama, "--epochs", "40", "--batch-size", "4", "--learning-rate", "2e-2",
               "--val-split", "0.2", "--early-stopping-patience", "2", data=data) == 0
    output = tmp_path / "out"
    checkpoints = sorted((output / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    evals = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]
    assert state["epoch"] < 40  # stopped early
    assert state["best_metric"] == pytest.approx(min(evals))
    final = json.loads((output / "chatkit.json").read_text())["metrics"]["eval_loss"]
    assert final == pytest.approx(min(evals), abs=1e-3)  # the best checkpoint was loaded at the end


def test_data_formats_are_normalised(tmp_path):
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]},
        {"prompt": "e", "response": "f"},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
    ]))
    conversations, report = read_conversations([str(jsonl)])
    assert conversations == [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
        [{"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}],
    ]
    assert report.describe() == ("read 3 conversations (1 in the ShareGPT format, 1 in the messages format, "
                                 "1 in the prompt/response format); skipped "
                                 "1 conversations starting with an assistant turn, 1 conversations without an assistant turn")


@pytest.mark.parametrize("content, fragment", [
    ("not json at all", "line 1 is not valid JSON"),
    ("[{\"messages\": [", "not valid JSON (line 1"),
    ("", "the file is empty"),
    ("[{\"text\": \"hi\"}]", "record 0: unknown record format (keys: text)"),
    ("[{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}]", "record 0, message 0: role 'bot' is not one of"),
    ("[{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}]", "no usable conversations"),
])
def test_bad_data_is_a_clear_error(tmp_path, tiny_llama, capsys, content, fragment):
    data = tmp_path / "bad.json"
    data.write_text(content)
    assert run(tmp_path, tiny_llama, data=str(data)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data}") and fragment in err and "Traceback" not in err


def test_existing_output_needs_overwrite(tmp_path, tiny_llama, capsys):
    assert run(tmp_path, tiny_llama, "--epochs", "1") == 0
    assert run(tmp_path, tiny_llama, "--epochs", "1") == 1
    assert "already holds a trained model; pass --overwrite" in capsys.readouterr().err
    assert run(tmp_path, tiny_llama, "--epochs", "1", "--overwrite") == 0


def test_config_file_and_flag_override(tmp_path, tiny_llama):
    config = tmp_path / "train.yaml"
    config.write_text(f"data: {write(tmp_path / 'd.json', FACTS)}\nmodel: {tiny_llama}\nlora-r: 4\nepochs: 1\n")
    options = parse(options_module.TrainOptions, cli.__doc__, ["--config", str(config), "--epochs", "2"])
    assert (options.lora_r, options.epochs, options.model) == (4, 2.0, str(tiny_llama))
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.1\n")
    with pytest.raises(ChatkitError, match="unknown option 'learning_rat'"):
        parse(options_module.TrainOptions, cli.__doc__, ["--config", str(bad)])


def test_option_problems_are_reported_together():
    options = options_module.TrainOptions(data=["x"], load_in_4bit=True, load_in_8bit=True, push_to_hub=True,
                                          batch_size=0, neftune_alpha=-1)
    assert options_module.problems(options) == [
        "--batch-size must be positive", "--neftune-alpha must be 0 (off) or more",
        "--load-in-4bit and --load-in-8bit: choose one", "--push-to-hub needs --hub-name USER/NAME"]


def test_gpu_out_of_memory_says_what_to_lower(tmp_path, tiny_llama, monkeypatch, capsys):
    from transformers import Trainer

    def out_of_memory(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train", out_of_memory)
    assert run(tmp_path, tiny_llama, "--epochs", "1") == 1
    err = capsys.readouterr().err
    assert "error: the GPU ran out of memory; lower --batch-size" in err and "--load-in-4bit" in err


def test_push_to_hub_is_private_and_never_prints_the_token(tmp_path, tiny_llama, monkeypatch, capsys):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, name, private, exist_ok):
            calls.append(("create", name, private))

        def upload_folder(self, folder_path, repo_id, ignore_patterns):
            calls.append(("upload", repo_id, sorted(os.listdir(folder_path)), ignore_patterns))

    monkeypatch.setenv("HF_TOKEN", "hf_secretsecretsecretsecretsecret")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert run(tmp_path, tiny_llama, "--epochs", "1", "--push-to-hub", "--hub-name", "me/my-chat") == 0
    assert calls[0] == ("create", "me/my-chat", True)
    assert calls[1][0:2] == ("upload", "me/my-chat") and "adapter_model.safetensors" in calls[1][2]
    assert calls[1][3] == ["checkpoints/*", "runs/*"]

    class Offline(FakeApi):
        def create_repo(self, *args, **kwargs):
            raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    assert run(tmp_path, tiny_llama, "--epochs", "1", "--overwrite", "--push-to-hub", "--hub-name", "me/x") == 1
    err = capsys.readouterr().err
    assert "--push-to-hub me/x: upload failed (ConnectionError)" in err and "The model is saved in" in err
    assert "hf_secret" not in err


@pytest.mark.parametrize("flag", ["--packing", "--gradient-checkpointing"])
def test_packing_and_gradient_checkpointing_train(tmp_path, tiny_llama, flag, capsys):
    assert run(tmp_path, tiny_llama, flag, "--epochs", "10", "--learning-rate", "1e-2", "--batch-size", "2") == 0
    state = json.loads((tmp_path / "out" / "checkpoints" / sorted(os.listdir(tmp_path / "out" / "checkpoints"))[-1]
                        / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert losses[-1] < losses[0] * 0.5
    if flag == "--packing":
        assert "packed into 1 sequences" in capsys.readouterr().err  # 8 short conversations, one row


def test_embedding_noise_changes_what_is_learned_the_same_way_each_run(tmp_path, tiny_llama):
    """NEFTune noise (input embeddings, training only) is off by default; on, it repeats with --seed."""
    flags = ("--epochs", "2", "--batch-size", "2", "--learning-rate", "1e-2")
    for name, extra in (("noisy", ("--neftune-alpha", "5")), ("again", ("--neftune-alpha", "5")), ("quiet", ())):
        assert run(tmp_path, tiny_llama, *flags, *extra, output=name) == 0
    noisy, again, quiet = (lora_weights(tmp_path / name) for name in ("noisy", "again", "quiet"))
    assert all(torch.equal(noisy[k], again[k]) for k in noisy)
    assert any(not torch.allclose(noisy[k], quiet[k]) for k in noisy if "lora_B" in k)
    assert json.loads((tmp_path / "noisy" / "chatkit.json").read_text())["options"]["neftune_alpha"] == 5.0
    from chatkit.device import choose_placement
    from chatkit.pipeline import trainer_arguments
    from chatkit.runplan import RunPlan

    cpu = choose_placement("cpu", "float32")
    settings = trainer_arguments(RunPlan.asked(options_module.TrainOptions(data=[], epochs=1, batch_size=1)), cpu, False)
    assert settings.neftune_noise_alpha is None
    noisy = trainer_arguments(RunPlan.asked(options_module.TrainOptions(data=[], epochs=1, batch_size=1, neftune_alpha=5)),
                              cpu, False)
    assert noisy.neftune_noise_alpha == 5.0


def test_seed_repeats_the_whole_run_in_one_process(tmp_path, tiny_llama):
    """--seed fixes the adapter's initial weights as well as the data order: the same command, the same model."""
    flags = ("--epochs", "1", "--batch-size", "2")
    torch.manual_seed(1)  # whatever the process drew before, the run starts from --seed
    assert run(tmp_path, tiny_llama, *flags, output="first") == 0
    torch.manual_seed(2)
    assert run(tmp_path, tiny_llama, *flags, output="second") == 0
    first, second = lora_weights(tmp_path / "first"), lora_weights(tmp_path / "second")
    assert any("lora_A" in k for k in first) and all(torch.equal(first[k], second[k]) for k in first)


def test_training_straight_from_the_mailed_zip(tmp_path, tiny_llama, capsys):
    """One command: the export zip is converted in memory (the converter's policy, --redact on request),
    its summary printed, and the model trained on the same records the converter would write."""
    from export_builder import simple, write_zip

    import convert_chatgpt_export

    conversations = [simple(f"c{i}", ("user", f"Mail me at person{i}@example.com, question {i}?"),
                            ("assistant", f"Sure, answer {i}.")) for i in range(6)]
    conversations.append(simple("empty", ("user", "Anyone there?")))  # no answer: left out, and said so
    for conversation, instructions in zip(conversations, ["Be brief.", "Be brief.", "Answer in French."]):
        conversation["mapping"]["ci"] = {"id": "ci", "parent": None, "children": [], "message": {
            "id": "ci-m", "author": {"role": "user"}, "content": {
                "content_type": "user_editable_context", "user_profile": "", "user_instructions": instructions},
            "metadata": {"is_visually_hidden_from_conversation": True}}}
    archive = write_zip(tmp_path / "export.zip", {"conversations.json": conversations})
    assert cli.main(["--data", str(archive), "--model", str(tiny_llama), "--output", str(tmp_path / "m"),
                     "--epochs", "1", "--redact", "--report", "none", "--val-split", "0"]) == 0
    err = capsys.readouterr().err
    assert (f"{archive}: converted 6 of 7 conversations (15 messages); custom instructions as the system message "
            "(2 different); left out 1 no exchange; redacted 6 (EMAIL)") in err
    assert "read 6 conversations (6 in the messages format)" in err
    assert (tmp_path / "m" / "adapter_config.json").is_file()
    report = (tmp_path / "m" / "report.md").read_text()  # which custom instructions were trained
    assert ("- System messages trained (an export's custom instructions, or --system-prompt): 2 different, "
            "opening 3 of 6 conversations\n  - 2×: Be brief.\n  - 1×: Answer in French.\n") in report
    # the same conversion as the converter's own
    assert convert_chatgpt_export.main([str(archive), str(tmp_path / "c.jsonl"), "--redact", "--quiet"]) == 0
    converted = [json.loads(line)["messages"] for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert converted[0][1]["content"] == "Mail me at [EMAIL], question 0?" and len(converted) == 6

"""train_chatgpt_model.py on bad input and faults: one clear line, the right model saved, resumable."""

from __future__ import annotations

import json
import os
import shutil
import zipfile

import pytest

import train_chatgpt_model as cli
from chatkit import engine, models
from interrupt import interrupt_at

FACT = {"messages": [{"role": "user", "content": "What is the secret code?"},
                     {"role": "assistant", "content": "The secret code of the Zorblat society is 4417."}]}


def data_file(tmp_path, count, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps([FACT] * count))
    return path


def train(tmp_path, model, *flags, data=None, output="out"):
    data = data or data_file(tmp_path, 8)
    return cli.main(["--data", str(data), "--model", str(model), "--output", str(tmp_path / output),
                     "--rehearsal", "0", "--batch-size", "2", *map(str, flags)])


def steps_saved(output):
    return json.loads((output / "chatkit.json").read_text())["metrics"]["steps"]


def test_overwrite_then_ctrl_c_then_resume_saves_the_new_run(tmp_path, tiny_llama, monkeypatch):
    # The earlier run: 16 conversations, 3 epochs, 24 steps, checkpoints up to checkpoint-24.
    assert train(tmp_path, tiny_llama, "--epochs", "3", "--save-steps", "4", data=data_file(tmp_path, 16, "a.json")) == 0
    # The new run over it: 8 conversations, 5 epochs, 20 steps, stopped after step 3.
    with monkeypatch.context() as patch:
        interrupt_at(patch, 2)
        assert train(tmp_path, tiny_llama, "--epochs", "5", "--save-steps", "4", "--overwrite") == 130
    assert sorted(os.listdir(tmp_path / "out" / "checkpoints")) == ["checkpoint-3"]  # the old run's are gone
    assert train(tmp_path, tiny_llama, "--epochs", "5", "--save-steps", "4", "--resume") == 0
    assert steps_saved(tmp_path / "out") == 20  # the old checkpoint-24 would have ended at once with 24


def test_a_half_saved_checkpoint_is_passed_over(tmp_path, tiny_llama, capsys):
    assert train(tmp_path, tiny_llama, "--epochs", "2", "--save-steps", "2") == 0
    checkpoints = tmp_path / "out" / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["checkpoint-6", "checkpoint-8"]
    (checkpoints / "checkpoint-8" / "trainer_state.json").unlink()  # killed while saving: written last
    (checkpoints / "checkpoint-8" / "optimizer.pt").write_bytes(b"cut")
    assert engine.latest_checkpoint(checkpoints).endswith("checkpoint-6")
    assert train(tmp_path, tiny_llama, "--epochs", "3", "--save-steps", "2", "--resume") == 0
    assert steps_saved(tmp_path / "out") == 12
    shutil.rmtree(checkpoints / "checkpoint-12")
    (checkpoints / "checkpoint-10" / "trainer_state.json").write_text('{"global_step": 1')  # cut mid-write
    assert train(tmp_path, tiny_llama, "--resume", str(checkpoints / "checkpoint-10")) == 1
    assert "this checkpoint was not saved whole" in capsys.readouterr().err


def test_output_that_is_a_file_fails_before_loading(tmp_path, tiny_llama, capsys, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "out").write_text("notes")
    assert train(tmp_path, tiny_llama) == 1
    assert f"error: --output {tmp_path / 'out'} is a file" in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == "notes"


@pytest.mark.parametrize("kind", ["zip", "json"])
def test_an_export_with_nothing_to_train_is_one_line(tmp_path, tiny_llama, capsys, kind):
    """The export is converted first; one whose conversations hold no exchange says so, naming the file."""
    conversation = {"title": "x", "mapping": {"r": {"id": "r", "parent": None, "children": []}}, "current_node": "r"}
    raw = tmp_path / "conversations.json"
    raw.write_text(json.dumps([conversation]))
    if kind == "zip":
        with zipfile.ZipFile(tmp_path / "export.zip", "w") as archive:
            archive.write(raw, "conversations.json")
        raw = tmp_path / "export.zip"
    assert train(tmp_path, tiny_llama, data=raw) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and str(raw) in error and "no exchange" in error
    assert not (tmp_path / "out").exists()


def test_an_unreachable_hub_fails_fast_and_names_the_ways_out(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=0: False)
    monkeypatch.setattr(models, "_HUB_CHECKED", {})
    assert train(tmp_path, "gpt2-small (124M)") == 1
    err = capsys.readouterr().err
    assert "'gpt2-small (124M)'" in err and "cannot be reached" in err
    assert "--model smollm2-135m" in err and "HF_HUB_OFFLINE=1" in err and "/local/path" in err


@pytest.mark.parametrize("flags, fragment", [
    (["--epochs", "0"], "--epochs must be positive"),
    (["--val-split", "1.5"], "--val-split must be at least 0 and below 1"),
    (["--lora-r", "sixteen"], "invalid int value"),
    (["--max-length", "8"], "--max-length must be at least 16 tokens"),
    (["--dtype", "int4"], "invalid choice"),
])
def test_bad_flags_are_usage_errors(tmp_path, capsys, flags, fragment):
    with pytest.raises(SystemExit) as info:
        cli.main(["--data", "x.json", *flags])
    assert info.value.code == 2 and fragment in capsys.readouterr().err


def test_a_config_value_of_the_wrong_type_is_named(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("data: x.json\nlora-r: sixteen\n")
    assert cli.main(["--config", str(config)]) == 1
    assert "--config" in capsys.readouterr().err


def test_a_lora_output_overwritten_by_a_full_fine_tune_loads_as_the_full_model(tmp_path, tiny_llama):
    out = tmp_path / "out"
    assert train(tmp_path, tiny_llama, "--epochs", "1", "--report", "none", "--merge") == 0
    assert models.resolve_model(str(out)).kind == "adapter" and (out / "merged").is_dir()
    assert train(tmp_path, tiny_llama, "--epochs", "1", "--report", "none", "--no-lora", "--overwrite") == 0
    assert models.resolve_model(str(out)).kind == "directory"
    assert not (out / "adapter_config.json").exists() and not (out / "merged").exists()  # the old model is gone
    assert train(tmp_path, tiny_llama, "--epochs", "1", "--report", "none", "--overwrite") == 0
    assert models.resolve_model(str(out)).kind == "adapter" and not (out / "model.safetensors").exists()


def test_an_interrupted_overwrite_leaves_the_old_model_whole(tmp_path, tiny_llama, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    out = tmp_path / "out"
    assert train(tmp_path, tiny_llama, "--epochs", "1", "--report", "none") == 0
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the new model is being saved

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", interrupted)
    assert train(tmp_path, tiny_llama, "--epochs", "2", "--report", "none", "--overwrite") == 130
    after = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    assert {name: after.get(name) for name in before if name.endswith((".json", ".safetensors"))} == {
        name: data for name, data in before.items() if name.endswith((".json", ".safetensors"))}
    assert not list(out.glob(".saving-*"))


def test_ctrl_c_while_a_full_fine_tune_replaces_another_leaves_one_model_whole(tmp_path, tiny_llama, monkeypatch):
    """The model, its record and its report move into place together: Ctrl-C during the report leaves the
    earlier model with its own report; Ctrl-C during the renames waits for them, so the new model is whole."""
    import signal

    from chatkit import report, runfolder

    out = tmp_path / "out"
    assert train(tmp_path, tiny_llama, "--epochs", "1", "--no-lora") == 0
    first = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    assert {"report.md", "README.md", "model.safetensors", "chatkit.json"} <= set(first)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the new model's report is written

    with monkeypatch.context() as patch:
        patch.setattr(report, "write_texts", interrupted)
        assert train(tmp_path, tiny_llama, "--epochs", "2", "--no-lora", "--overwrite") == 130
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == first
    assert not list(out.glob(".saving-*"))

    real_replace, renames = os.replace, []

    def replace(source, target):
        if os.path.dirname(target) == str(out):  # publishing the staged model
            renames.append(os.path.basename(target))
            if len(renames) == 1:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the first file moves
        real_replace(source, target)

    monkeypatch.setattr(runfolder.os, "replace", replace)
    assert train(tmp_path, tiny_llama, "--epochs", "2", "--no-lora", "--overwrite", "--report", "none") == 130
    after = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    assert renames[-1] == "chatkit.json" and len(renames) > 3
    assert after["model.safetensors"] != first["model.safetensors"] and steps_saved(out) == 2 * steps_of(first)
    assert "Answers were not generated" in after["report.md"].decode()  # the new model's report came with it
    assert after["README.md"] != first["README.md"]
    assert not list(out.glob(".saving-*"))


def steps_of(files):
    return json.loads(files["chatkit.json"])["metrics"]["steps"]


def test_a_folder_of_other_files_is_refused_without_overwrite(tmp_path, tiny_llama, capsys, monkeypatch):
    """`--output .` in a project folder: the user's files are not mixed with a model unasked."""
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    data = data_file(tmp_path, 4)
    assert cli.main(["--data", str(data), "--model", str(tiny_llama), "--output", "."]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: --output . holds other files (") and "data.json" in error and "--overwrite" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json", "notes.txt"]


def test_a_second_run_into_the_same_output_is_refused(tmp_path, tiny_llama, capsys):
    from chatkit.files import output_lock

    with output_lock(tmp_path / "out"):  # the first run, still training
        assert train(tmp_path, tiny_llama, "--epochs", "1") == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is being written by another training run (process" in error
    assert not (tmp_path / "out").exists()  # nothing of either run is left behind


@pytest.mark.parametrize("flags, says", [
    (["--seed", str(2**40)], "--seed must be a whole number from 0 to 4294967295"),
    (["--seed", "-1"], "--seed must be a whole number from 0 to 4294967295"),
    (["--lr-scheduler", "cosnie"], "invalid choice: 'cosnie'"),
])
def test_option_values_are_checked_where_they_are_declared(tmp_path, tiny_llama, capsys, flags, says):
    with pytest.raises(SystemExit) as exit_code:
        train(tmp_path, tiny_llama, *flags)
    assert exit_code.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("content, says, code", [
    (b"lr_scheduler: cosnie\n", "--lr-scheduler 'cosnie' is not one of", 2),
    (b"epochs: true\n", "epochs should be float, not True", 1),
    (b"seed: 99999999999\n", "--seed must be a whole number", 2),
    (b"epochs: 2\nsystem_prompt: \xff\xfe caf\xe9\n", "not UTF-8 text", 1),
])
def test_a_config_file_with_wrong_values_is_one_line(tmp_path, tiny_llama, capsys, content, says, code):
    config = tmp_path / "run.yaml"
    config.write_bytes(content)
    data = data_file(tmp_path, 4)
    try:
        result = cli.main(["--data", str(data), "--model", str(tiny_llama), "--output", str(tmp_path / "o"),
                           "--config", str(config)])
    except SystemExit as exc:  # a usage error
        result = exc.code
    err = capsys.readouterr().err
    assert result == code and says in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_resume_that_does_not_fit_the_checkpoint_is_refused(tmp_path, tiny_llama, capsys, monkeypatch):
    with monkeypatch.context() as patch:
        interrupt_at(patch, 2)
        assert train(tmp_path, tiny_llama, "--epochs", "3", "--save-steps", "4") == 130
    assert train(tmp_path, tiny_llama, "--epochs", "3", "--resume", "--lora-r", "8") == 1
    assert "was trained with --lora-r 16, not 8; resume with --lora-r 16" in capsys.readouterr().err
    assert train(tmp_path, tiny_llama, "--epochs", "3", "--resume", "--no-lora") == 1
    assert "holds a LoRA adapter; resume it without --no-lora" in capsys.readouterr().err
    state = next((tmp_path / "out" / "checkpoints").glob("checkpoint-*")) / "trainer_state.json"
    state.write_text("[1, 2")
    assert train(tmp_path, tiny_llama, "--epochs", "3", "--resume") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --resume ") and "checkpoint-" in err[-1] and "trainer_state.json" in err[-1]
    assert "damaged" in err[-1] and "without --resume" in err[-1]


def test_a_config_whose_data_is_not_a_list_of_files_is_one_line(tmp_path, tiny_llama, capsys):
    config = tmp_path / "run.json"
    config.write_text('{"data": 5}')
    assert cli.main(["--config", str(config), "--model", str(tiny_llama), "--output", str(tmp_path / "o")]) == 1
    assert f"--config {config}: data should be a str or a list of them, not 5" in capsys.readouterr().err


def test_a_checkpoint_whose_step_is_not_a_number_is_passed_over(tmp_path, tiny_llama, capsys):
    assert train(tmp_path, tiny_llama, "--epochs", "2", "--save-steps", "2") == 0
    checkpoints = tmp_path / "out" / "checkpoints"
    state = json.loads((checkpoints / "checkpoint-8" / "trainer_state.json").read_text())
    (checkpoints / "checkpoint-8" / "trainer_state.json").write_text(json.dumps(dict(state, global_step="eight")))
    assert engine.latest_checkpoint(checkpoints).endswith("checkpoint-6")
    assert train(tmp_path, tiny_llama, "--resume", str(checkpoints / "checkpoint-8")) == 1
    assert "this checkpoint was not saved whole" in capsys.readouterr().err
    assert train(tmp_path, tiny_llama, "--epochs", "2", "--save-steps", "2", "--resume") == 0
    assert steps_saved(tmp_path / "out") == 8


def test_a_damaged_budget_record_is_one_line(tmp_path, tiny_llama, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        interrupt_at(patch, 2)
        assert train(tmp_path, tiny_llama, "--epochs", "3", "--time-budget", "10m") == 130
    spent = tmp_path / "out" / "checkpoints" / "budget.json"
    assert json.loads(spent.read_text())["used_s"] > 0
    spent.write_text('{"used_s": "lots"}')
    assert train(tmp_path, tiny_llama, "--epochs", "3", "--time-budget", "10m", "--resume") == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (f"error: {spent}: used_s should be the seconds of the budget spent, not 'lots'; delete the "
                     "file to count the budget from now")


def test_preferences_that_are_a_folder_or_not_utf8_name_the_file(tmp_path, tiny_llama, capsys):
    folder = tmp_path / "pairs"
    folder.mkdir()
    assert train(tmp_path, tiny_llama, "--preferences", folder) == 1
    assert f"--preferences {folder} is a folder; name the pairs file in it" in capsys.readouterr().err
    latin = tmp_path / "pairs.jsonl"
    latin.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    assert train(tmp_path, tiny_llama, "--preferences", latin) == 1
    assert f"--preferences {latin}: not UTF-8 text (byte 15)" in capsys.readouterr().err


def test_sigterm_during_dpo_ends_the_command_as_terminated(tmp_path, tiny_llama, monkeypatch, capsys):
    """kill (SIGTERM) asks the process to end, not to finish: exit 143 as in supervised training, no model
    saved half-way, where Ctrl-C keeps the supervised model and the DPO steps taken."""
    import signal

    from chatkit import dpo

    pair = {"prompt": "What is the code?", "chosen": "The code is 4417.", "rejected": "No idea."}
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps(pair) + "\n")
    original = dpo.dpo_loss

    def loss_then_kill(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(dpo, "dpo_loss", loss_then_kill)
    assert train(tmp_path, tiny_llama, "--preferences", prefs, "--report", "none") == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "terminated"
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert not list((tmp_path / "out").glob(".saving-*"))

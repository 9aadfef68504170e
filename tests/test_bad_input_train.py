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
def test_a_raw_export_given_to_the_trainer_says_convert_first(tmp_path, tiny_llama, capsys, kind):
    conversation = {"title": "x", "mapping": {"r": {"id": "r", "parent": None, "children": []}}, "current_node": "r"}
    raw = tmp_path / "conversations.json"
    raw.write_text(json.dumps([conversation]))
    if kind == "zip":
        with zipfile.ZipFile(tmp_path / "export.zip", "w") as archive:
            archive.write(raw, "conversations.json")
        raw = tmp_path / "export.zip"
    assert train(tmp_path, tiny_llama, data=raw) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {raw} is a ChatGPT export") and "convert_chatgpt_export.py" in err


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

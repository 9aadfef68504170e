"""One error boundary: file-system failures and damaged files become one `error:` line in every script."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

import convert_chatgpt_export
import demo_chatbot
import export_model
import train_chatgpt_model
from chatkit.cli import failure_line, run_main

DATA = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}] * 4


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and errors == err[-1:], err
    assert "Traceback" not in "\n".join(err)
    return errors[0]


@pytest.mark.parametrize("code, fix", [
    (errno.ENOSPC, "free some space"), (errno.EROFS, "read-only"), (errno.EACCES, "permissions"),
    (errno.ENOTDIR, "is a file, not a folder"), (errno.EISDIR, "is a folder"), (errno.ENOENT, "no such file"),
])
def test_every_file_system_failure_names_the_file_and_the_fix(code, fix, capsys):
    def fails(argv):
        raise OSError(code, os.strerror(code), "/data/out/model.safetensors")

    assert run_main(fails, []) == 1
    line = one_error_line(capsys)
    assert "/data/out/model.safetensors" in line and fix in line and os.strerror(code) in line


def test_a_bug_keeps_its_traceback(monkeypatch):
    def bug(argv):
        raise AttributeError("a bug")

    with pytest.raises(AttributeError):
        run_main(bug, [])
    monkeypatch.setenv("CHATKIT_DEBUG", "1")
    with pytest.raises(OSError):
        run_main(lambda argv: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device", "x")), [])


def test_damaged_library_files_are_one_line():
    import pickle
    import zipfile

    assert "damaged" in failure_line(zipfile.BadZipFile("File is not a zip file"))
    assert "nested too deeply" in failure_line(RecursionError("maximum recursion depth exceeded"))
    assert "UTF-8" in failure_line(b"\xff".decode("utf-8", "strict") if False else UnicodeDecodeError(
        "utf-8", b"\xff", 0, 1, "invalid start byte"))
    assert "weights file is damaged" in failure_line(pickle.UnpicklingError("Weights only load failed"))
    assert "encrypted" in failure_line(RuntimeError("File 'conversations.json' is encrypted, password required"))
    assert "compression" in failure_line(NotImplementedError("That compression method is not supported"))
    assert failure_line(ValueError("a bug")) is None


def test_an_output_under_a_file_is_one_line_in_every_script(tmp_path, tiny_llama, capsys):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(DATA))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert train_chatgpt_model.main(["--data", str(data), "--model", str(tiny_llama), "--output",
                                     str(blocker / "model"), "--epochs", "1", "--report", "none"]) == 1
    assert str(blocker) in one_error_line(capsys)
    assert export_model.main([str(tiny_llama), "--gguf", str(blocker / "m.gguf")]) == 1
    assert str(blocker) in one_error_line(capsys)
    export = tmp_path / "conversations.json"
    export.write_text(json.dumps([]))
    assert convert_chatgpt_export.main([str(export), str(blocker / "out.jsonl")]) == 1
    assert str(blocker) in one_error_line(capsys)
    assert blocker.read_text() == "not a folder"


def test_a_dangling_link_as_data_is_one_line(tmp_path, tiny_llama, capsys):
    link = tmp_path / "data.json"
    link.symlink_to(tmp_path / "gone.json")
    assert train_chatgpt_model.main(["--data", str(link), "--model", str(tiny_llama), "--output",
                                     str(tmp_path / "m")]) == 1
    assert str(link) in one_error_line(capsys)


def test_a_damaged_weights_file_is_one_line(tmp_path, tiny_llama, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    assert demo_chatbot.main([str(model), "--query", "Hi"]) == 1
    assert "damaged" in one_error_line(capsys) or str(model) in capsys.readouterr().err


def test_a_config_without_model_type_is_one_line(tmp_path, tiny_llama, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    del config["model_type"]
    (model / "config.json").write_text(json.dumps(config))
    assert export_model.main([str(model), "--gguf", str(tmp_path / "m.gguf")]) == 1
    line = one_error_line(capsys)
    assert str(model) in line
    assert not (tmp_path / "m.gguf").exists()


def test_a_utf16_file_and_a_folder_given_as_data_say_what_they_are(tmp_path, tiny_llama, capsys):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(DATA), encoding="utf-16")
    assert train_chatgpt_model.main(["--data", str(data), "--model", str(tiny_llama), "--output",
                                     str(tmp_path / "m")]) == 1
    assert "is UTF-16 text" in one_error_line(capsys)
    folder = tmp_path / "folder"
    folder.mkdir()
    assert train_chatgpt_model.main(["--data", str(folder), "--model", str(tiny_llama), "--output",
                                     str(tmp_path / "m")]) == 1
    assert f"--data {folder} is a folder" in one_error_line(capsys)

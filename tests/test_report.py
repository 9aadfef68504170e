"""The report every training run leaves: report.md, loss.png and the model card."""

from __future__ import annotations

import json
import struct
from pathlib import Path


import train_chatgpt_model
from chatkit.report import STILL_KNOWS, chosen_prompts, verdict

REPLIES = {"Hello": "Hi there, friend!", "What is the secret code?": "The secret code is 4417.",
           "Who keeps the lighthouse?": "Odile Brask keeps the lighthouse."}


def png_size(path: Path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def table_rows(text: str, heading: str):
    """The rows of the Markdown table under `heading`, as lists of cells."""
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[1:]]


def train(tmp_path, model, *extra):
    data = tmp_path / "facts.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                for q, a in REPLIES.items()] * 4))
    output = tmp_path / "model"
    assert train_chatgpt_model.main(["--data", str(data), "--model", str(model), "--output", str(output),
                                     "--epochs", "30", "--learning-rate", "1e-2", "--batch-size", "4",
                                     "--val-split", "0", *extra]) == 0
    return output


def test_a_run_leaves_a_report_a_plot_and_a_model_card(tmp_path, tiny_llama, capsys):
    output = train(tmp_path, tiny_llama)
    printed = capsys.readouterr().err
    assert f"Report: {output / 'report.md'} (loss " in printed
    report = (output / "report.md").read_text()
    assert "facts.json: 12 conversations" in report and f"Base model: {tiny_llama.name}" in report
    assert "Method: LoRA; 30 epochs" in report and "on cpu (float32)" in report
    assert "Loss on 12 training examples (there is no validation split)" in report
    info = json.loads((output / "chatkit.json").read_text())["metrics"]
    assert info["loss_before"] > 2 * info["loss_after"] and info["report_s"] > 0
    assert f"**{info['loss_before']:.3f} → {info['loss_after']:.3f}**" in report

    prompts = table_rows(report, "Your prompts")
    assert [row[:2] for row in prompts] == [[q, a] for q, a in REPLIES.items()]
    assert [row[3] for row in prompts] == list(REPLIES.values())  # the trained model answers as taught
    assert all(row[2] != row[3] for row in prompts)  # the base model (adapter off) does not
    general = table_rows(report, "Still knows")
    assert [row[0] for row in general] == [q for q, _ in STILL_KNOWS]
    assert all(row[3] in ("same", "reworded", "*changed*", "**LOST**") for row in general)

    assert png_size(output / "loss.png") == (800, 450)
    card = (output / "README.md").read_text()
    front = card.split("---\n")[1]
    assert f"base_model: {tiny_llama.name}\n" in front and "library_name: peft" in front
    assert "[More Information Needed]" not in card and str(tmp_path) not in card and str(tiny_llama) not in card
    assert "python demo_chatbot.py model --compare" in card and "export_model.py model --gguf" in card


def test_report_none_keeps_the_figures_and_the_plot(tmp_path, tiny_llama):
    output = train(tmp_path, tiny_llama, "--report", "none")
    report = (output / "report.md").read_text()
    assert "Your prompts" not in report and "Still knows" not in report and "`--report none`" in report
    assert "→" in report.split("## Loss", 1)[1] and png_size(output / "loss.png") == (800, 450)


def test_full_fine_tuning_compares_with_the_model_before_training(tmp_path, tiny_llama):
    output = train(tmp_path, tiny_llama, "--no-lora", "--learning-rate", "3e-3")
    report = (output / "report.md").read_text()
    prompts = table_rows(report, "Your prompts")
    assert [row[3] for row in prompts] == list(REPLIES.values()) and all(row[2] != row[3] for row in prompts)
    assert "library_name: transformers" in (output / "README.md").read_text()


def test_plan_counts_the_report(tmp_path, tiny_llama, capsys):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello."}]}] * 3))
    for flags, shown in (([], True), (["--report", "none"], False)):
        assert train_chatgpt_model.main(["--data", str(data), "--model", str(tiny_llama), "--dry-run",
                                         "--output", str(tmp_path / "m"), *flags]) == 0
        plan = capsys.readouterr().err
        assert ("report " in plan.split("about", 1)[1]) == shown


def test_verdicts():
    assert verdict("The capital of France is Paris.", "The capital of France is Tallinn.", ("paris",)) == "LOST"
    assert verdict("It is Paris.", "it is  paris", ("paris",)) == "same"
    assert verdict("Paris.", "The capital is Paris!", ("paris",)) == "reworded"
    assert verdict("Neptune.", "Saturn.", ("jupiter",)) == "changed"
    assert verdict("Seven days.", "A week has 7 days.", ("seven", "7")) == "reworded"


def test_prompts_come_from_validation_first():
    val = [[{"role": "user", "content": "v1"}, {"role": "assistant", "content": "a1"}]]
    train = [[{"role": "system", "content": "s"}, {"role": "user", "content": f"t{i}"},
              {"role": "assistant", "content": f"b{i}"}] for i in range(9)]
    long = [[{"role": "user", "content": "x" * 601}, {"role": "assistant", "content": "y"}]]
    chosen = chosen_prompts(val + long, train)
    assert chosen[0] == ("v1", "a1") and chosen[1] == ("t0", "b0") and len(chosen) == 6  # the long one passed over

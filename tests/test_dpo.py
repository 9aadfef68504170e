"""train_chatgpt_model.py --preferences: the DPO loss, pair checks, and the margin rising on held-out pairs."""

from __future__ import annotations

import json
import math

import pytest

import train_chatgpt_model as cli
from chatkit.dpo import dpo_loss


def test_the_loss_is_the_published_dpo_loss():
    """-log sigmoid(beta * ((pc - rc) - (pr - rr))), averaged; the margins as TRL logs its reward margins."""
    import torch

    policy_chosen, policy_rejected = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    reference_chosen, reference_rejected = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
    loss, margins = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.1)
    expected = [0.1 * ((-10 + 11) - (-12 + 11)), 0.1 * ((-4 + 5) - (-3 + 5))]
    assert margins.tolist() == pytest.approx(expected)
    assert float(loss) == pytest.approx(sum(-math.log(1 / (1 + math.exp(-m))) for m in expected) / 2)
    same = torch.tensor([-7.0])
    assert float(dpo_loss(same, same, same, same, 0.5)[0]) == pytest.approx(math.log(2))  # no preference yet


PAIR = {"prompt": [{"role": "user", "content": "Can you help me?"}],
        "chosen": [{"role": "assistant", "content": "Yes, gladly. What do you need?"}],
        "rejected": [{"role": "assistant", "content": "No."}]}


@pytest.mark.parametrize("change, says", [
    (lambda p: p.pop("rejected"), "line 2: missing rejected"),
    (lambda p: p.update(chosen=[{"role": "assistant", "content": "  "}]), "line 2: 'chosen' is empty"),
    (lambda p: p.update(rejected=p["chosen"]), "line 2: 'chosen' and 'rejected' are the same answer"),
    (lambda p: p.update(prompt=[{"role": "assistant", "content": "Hi"}]), "line 2: the prompt should end with"),
])
def test_a_bad_pair_is_one_line_naming_it_before_training(tmp_path, tiny_llama, capsys, change, says):
    bad = json.loads(json.dumps(PAIR))
    change(bad)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps(PAIR) + "\n" + json.dumps(bad) + "\n")
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"messages": PAIR["prompt"] + PAIR["chosen"]}] * 4))
    assert cli.main(["--data", str(data), "--model", str(tiny_llama), "--output", str(tmp_path / "m"),
                     "--preferences", str(prefs)]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: {prefs} {says}") and not (tmp_path / "m").exists()


def test_dpo_raises_the_chosen_margin_on_held_out_pairs(tmp_path, tiny_llama, capsys):
    """Ten pairs where the user preferred a helpful answer that ends with a question; two held out."""
    pairs = [{"prompt": [{"role": "user", "content": f"Tell me about topic {i}."}],
              "chosen": [{"role": "assistant", "content": f"Topic {i} is a good one. What would you like to know?"}],
              "rejected": [{"role": "assistant", "content": f"Topic {i}."}]} for i in range(10)]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"messages": p["prompt"] + p["chosen"]} for p in pairs[:4]]))
    assert cli.main(["--data", str(data), "--model", str(tiny_llama), "--output", str(tmp_path / "m"),
                     "--epochs", "2", "--val-split", "0", "--rehearsal", "0", "--report", "none",
                     "--preferences", str(prefs), "--dpo-learning-rate", "5e-3", "--dpo-epochs", "3"]) == 0
    metrics = json.loads((tmp_path / "m" / "chatkit.json").read_text())["metrics"]
    assert metrics["preference_pairs"] == 10 and metrics["margin_measured_on"] == "held-out"
    assert metrics["margin_after"] > metrics["margin_before"] and metrics["preferred_after"] == 2
    assert metrics["dpo_steps"] == 3 * 8
    err = capsys.readouterr().err
    assert "preferences: 10 preference pairs; DPO (beta 0.1, 3 epochs) on 8, margin measured on 2 held-out" in err
    assert "Preferences: DPO on 10 pairs" in (tmp_path / "m" / "report.md").read_text()

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


@pytest.mark.parametrize("sft_weight", [0.0, 1.0])
def test_the_loss_and_its_gradients_are_trls_on_the_same_batch(tmp_path, tiny_llama, sft_weight):
    """TRL's DPOTrainer and this engine on one batch TRL collated, with an adapter that was already trained
    (TRL then keeps a frozen copy of it as the reference; this engine computes the reference once, before
    DPO): the same loss and the same gradients of every LoRA weight. With --dpo-sft-weight, TRL's RPO
    (loss types sigmoid and sft, weighted)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from chatkit.dpo import PreferenceReport, answer_tokens, pair_examples, pair_logps, sequence_logps

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))  # as if supervised training had moved it
    pairs = [{"prompt": [{"role": "user", "content": f"Tell me about topic {i}."}],
              "chosen": [{"role": "assistant", "content": f"Topic {i} is a good one. What would you like?"}],
              "rejected": [{"role": "assistant", "content": f"Topic {i}{'!' * i}"}]} for i in range(3)]
    trainer = DPOTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(pairs),
                         args=DPOConfig(output_dir=str(tmp_path), beta=0.1, report_to=[], use_cpu=True, bf16=False,
                                        **({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]}
                                           if sft_weight else {})))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])

    examples = []  # TRL's rows as this engine's (ids, labels): chosen rows first, then rejected
    for row in range(2 * len(pairs)):
        real = batch["attention_mask"][row].bool()
        ids = batch["input_ids"][row][real].tolist()
        labels = [t if m else -100 for t, m in zip(ids, batch["completion_mask"][row][real].tolist())]
        examples.append((ids, labels))
    examples = [{"chosen": examples[i], "rejected": examples[i + len(pairs)]} for i in range(len(pairs))]
    model.eval()
    reference = torch.tensor(pair_logps(model, examples))
    with torch.no_grad():  # DPO has taken a step since: the adapter moved away from its frozen copy
        for name, weight in model.named_parameters():
            if "lora_B.default" in name:
                weight.add_(0.05 * torch.randn_like(weight))

    theirs = trainer.compute_loss(model, batch)
    theirs.backward()
    their_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    policy = torch.stack([torch.stack([sequence_logps(model, *e[side]) for side in ("chosen", "rejected")])
                          for e in examples])
    tokens = torch.tensor([answer_tokens(e["chosen"][1]) for e in examples])
    ours, _ = dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], 0.1, sft_weight, tokens)
    ours.backward()
    if sft_weight:  # the supervised term is there, and large: the answers' loss per token
        assert float(ours.detach()) > 1.0
    else:
        assert abs(float(theirs.detach()) - math.log(2)) > 1e-3  # the policy differs from the reference
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-5)
    assert their_grads and any(float(g.abs().max()) > 0 for g in their_grads.values())
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad, their_grads[name], rtol=1e-3, atol=1e-6)

    # TRL marks the same answer tokens as this engine's tokenization does, plus the template's newline after
    # the end of turn (which supervised training does not train either)
    mine = pair_examples(pairs, tokenizer, 512, None, PreferenceReport())
    for pair, example in zip(mine, examples):
        for side in ("chosen", "rejected"):
            ours_trained = [t for t in pair[side][1] if t != -100]
            theirs_trained = [t for t in example[side][1] if t != -100]
            assert theirs_trained[:len(ours_trained)] == ours_trained
            assert tokenizer.decode(theirs_trained[len(ours_trained):]).strip() == ""


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
    assert metrics["margin_after"] > metrics["margin_before"] and metrics["margin_rose"] == 2
    assert metrics["dpo_steps"] == metrics["dpo_planned_steps"] == 3 * 8 and "dpo_stopped" not in metrics
    err = capsys.readouterr().err
    assert ("preferences: 10 preference pairs; DPO (beta 0.1, 3 epochs, supervised loss weighted 1) on 8, margin "
            "measured on 2 held-out") in err
    assert (f"margin went from {metrics['margin_before']} to {metrics['margin_after']} on 2 held-out pairs "
            "(it rose on 2 of them)") in err
    assert "Preferences: DPO on 10 pairs" in (tmp_path / "m" / "report.md").read_text()
    card = (tmp_path / "m" / "README.md").read_text()
    assert "Then learned from the user's preferences: DPO on 10 pairs: the chosen-minus-rejected" in card


def test_the_supervised_term_keeps_the_chosen_answers_likely(tiny_llama):
    """DPO alone widens the gap between chosen and rejected, and may do it by making both less likely; with
    --dpo-sft-weight the chosen answers themselves become more likely (what keeps answers from drifting)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatkit.dpo import PreferenceReport, pair_examples, pair_logps, train_dpo

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    pairs = [{"prompt": [{"role": "user", "content": f"Tell me about topic {i}."}],
              "chosen": [{"role": "assistant", "content": f"Topic {i} is a good one. What would you like to know?"}],
              "rejected": [{"role": "assistant", "content": f"Topic {i} is a good one."}]} for i in range(6)]
    chosen_after = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                               LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        examples = pair_examples(pairs, tokenizer, 512, None, PreferenceReport())
        model.eval()
        before = pair_logps(model, examples)
        figures = train_dpo(model, examples, 3, 0.1, 5e-3, weight, reference=before)
        after = pair_logps(model, examples)
        assert figures["dpo_steps"] == 18
        assert sum(c - r for c, r in after) > sum(c - r for c, r in before)  # the margin rose either way
        chosen_after[weight] = sum(c for c, _ in after)
        if weight:
            assert chosen_after[weight] > sum(c for c, _ in before)
    assert chosen_after[1.0] > chosen_after[0.0]


def test_pairs_held_out_share_no_prompt_with_the_pairs_trained(tmp_path, tiny_llama):
    """One chosen answer against each of three regenerations gives three pairs with one prompt, and a pair
    may be given twice: such pairs go to one side, so the held-out margin is measured on prompts and chosen
    answers DPO never saw."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from chatkit.dpo import tokenize_preferences

    pairs = []
    for topic in range(6):
        for regeneration in range(3 if topic % 2 else 1):
            pairs.append({"prompt": f"Tell me about topic {topic}.", "chosen": f"Topic {topic} is fine. Why?",
                          "rejected": f"Topic {topic}, take {regeneration}."})
    pairs.append(pairs[0])  # given twice
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    options = SimpleNamespace(preferences=str(prefs), max_length=256, system_prompt=None, seed=3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    for seed in range(6):
        options.seed = seed
        prepared = tokenize_preferences(options, tokenizer)
        assert prepared.where == "held-out" and len(prepared.train) + len(prepared.measured) == len(pairs)
        prompt = lambda example: tuple(t for t, label in zip(*example["chosen"]) if label == -100)  # noqa: E731
        assert prepared.measured and not {prompt(e) for e in prepared.measured} & {prompt(e) for e in prepared.train}

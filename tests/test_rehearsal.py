"""Rehearsal: the model's own answers to general prompts, trained towards its own distribution."""

from __future__ import annotations

import json

import pytest
import torch

import train_chatgpt_model as cli
from chatkit import forward, rehearsal
from chatkit import report  # noqa: F401  (imported before a test replaces rehearsal.own_answers: the report keeps the real one)
from chatkit.engine import ChatTrainer
from chatkit.examples import PaddingCollator, tokenize_examples
from chatkit.chat import ChatSession, GenerationSettings
from chatkit.formatting import IGNORE_INDEX, render
from chatkit.models import load_model, resolve_model
from chatkit.device import choose_placement

FACT = {"messages": [{"role": "user", "content": "What is the secret code?"},
                     {"role": "assistant", "content": "The secret code of the Zorblat society is 4417."}]}


def load(path):
    loaded = load_model(resolve_model(str(path)), choose_placement("cpu", "float32"))
    return loaded.model, loaded.tokenizer


def test_auto_count_scales_with_the_data_and_is_bounded():
    assert [rehearsal.auto_count(n) for n in (0, 1, 8, 9, 60, 160, 5000)] == [0, 1, 1, 2, 8, 20, 32]
    assert len(set(rehearsal.GENERAL_PROMPTS)) == len(rehearsal.GENERAL_PROMPTS) >= 1.5 * rehearsal.AUTO_MAX


def test_batched_answers_are_the_chat_answers(tiny_llama):
    """Left-padded batch generation gives each prompt exactly the answer the chat gives it alone."""
    model, tokenizer = load(tiny_llama)
    prompts = rehearsal.GENERAL_PROMPTS[:5]  # different lengths, so the batch is padded
    batched = rehearsal.own_answers(model, tokenizer, prompts, max_new_tokens=6)
    session = ChatSession(str(tiny_llama), device="cpu",
                          settings=GenerationSettings(temperature=0, max_new_tokens=6, repetition_penalty=1.0))
    alone = []
    for prompt in prompts:
        session.reset()
        alone.append(session.reply(prompt))
    assert batched == alone
    assert all(text for text in alone)
    cut = rehearsal.own_answers(model, tokenizer, prompts, max_new_tokens=2)
    assert [a.startswith(c) for a, c in zip(batched, cut)] == [True] * len(prompts)
    assert sum(map(len, cut)) < sum(map(len, batched))


def test_rehearsal_takes_the_first_prompts_and_skips_empty_answers(tiny_llama, monkeypatch):
    model, tokenizer = load(tiny_llama)
    answers = iter(["Four.", "A cut answer that ran", "", "Blue whale."])
    monkeypatch.setattr(rehearsal, "own_answers", lambda m, t, prompts, system_prompt=None: [next(answers) for _ in prompts])
    result = rehearsal.rehearsal_conversations(model, tokenizer, 4)
    assert result.asked == 4
    assert [c[1]["content"] for c in result.conversations] == ["Four.", "A cut answer that ran", "Blue whale."]
    assert [c[0]["content"] for c in result.conversations] == [rehearsal.GENERAL_PROMPTS[i] for i in (0, 1, 3)]


def test_answer_states_do_not_depend_on_the_batch(tiny_llama):
    model, tokenizer = load(tiny_llama)
    prompts = rehearsal.GENERAL_PROMPTS[:3]  # different lengths: padded in the batch
    together = rehearsal.answer_states(model, tokenizer, prompts)
    alone = []
    for prompt in prompts:  # a plain forward of the whole prompt, no shared start, no cache
        text = render([{"role": "user", "content": prompt}], tokenizer, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            alone.append(model.model(input_ids=ids).last_hidden_state[0, -1])
    assert together.shape == (3, model.config.hidden_size)
    assert torch.allclose(together, torch.stack(alone), atol=1e-4)


def test_answer_states_of_a_model_without_a_separate_body(tiny_llama, monkeypatch):
    """Where no transformer body can be reached, the whole model's last hidden states are used."""
    model, tokenizer = load(tiny_llama)
    prompts = rehearsal.GENERAL_PROMPTS[:3]
    expected = rehearsal.answer_states(model, tokenizer, prompts)
    monkeypatch.setattr(forward, "causal_lm_parts", lambda m: (m, None))
    assert torch.allclose(rehearsal.answer_states(model, tokenizer, prompts), expected, atol=1e-4)


def test_general_prompts_like_the_users_come_first(tiny_llama, monkeypatch):
    model, tokenizer = load(tiny_llama)
    for target in (rehearsal.GENERAL_PROMPTS[20], rehearsal.GENERAL_PROMPTS[41]):
        ranked = rehearsal.closest_prompts(model, tokenizer, [target] * 3)
        assert ranked[0] == target and sorted(ranked) == sorted(rehearsal.GENERAL_PROMPTS)
    assert rehearsal.closest_prompts(model, tokenizer, []) == rehearsal.GENERAL_PROMPTS

    monkeypatch.setattr(rehearsal, "own_answers", lambda m, t, prompts, system_prompt=None:
                        ["Fine."] * len(prompts))
    result = rehearsal.rehearsal_conversations(model, tokenizer, 2, like=[rehearsal.GENERAL_PROMPTS[41]] * 3)
    assert [c[0]["content"] for c in result.conversations] == ranked[:2]


def test_teacher_loss_is_zero_for_the_unchanged_model_and_grows_with_change(tiny_llama):
    model, tokenizer = load(tiny_llama)
    conversation = [{"role": "user", "content": "What is 12 times 12?"}, {"role": "assistant", "content": "It is 144."}]
    examples = tokenize_examples([conversation], tokenizer, 1024)
    teacher = rehearsal.attach_teacher(model, examples)
    index = torch.tensor(examples[0]["teacher_index"])
    labels = torch.tensor(examples[0]["labels"])
    trained = (labels != IGNORE_INDEX).nonzero().flatten()
    assert trained.numel() == teacher.ids.shape[0] > 0 and bool((index[trained] >= 0).all())
    assert int((index >= 0).sum()) == trained.numel()

    def loss():
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([examples[0]["input_ids"]])).logits[0]
        return float(rehearsal.teacher_loss(logits[trained - 1], teacher, index[trained]))

    assert abs(loss()) < 1e-4
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1.5)
    assert loss() > 0.01


def answer_logprobs(model, tokenizer, prompt, answer):
    """The model's next-token log-probabilities at each trained position of a prompt and answer."""
    conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    example = tokenize_examples([conversation], tokenizer, 1024)[0]
    positions = [p - 1 for p, label in enumerate(example["labels"]) if p > 0 and label != IGNORE_INDEX]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, positions].float()
    return torch.log_softmax(logits, -1)


@pytest.mark.parametrize("packing", [False, True])
def test_rehearsal_keeps_the_model_near_its_own_answers(tmp_path, tiny_llama, monkeypatch, capsys, packing):
    """Trained hard on one fact, the model drifts on unrelated prompts much less with rehearsal."""
    monkeypatch.setattr(rehearsal, "own_answers", lambda m, t, prompts, system_prompt=None:
                        [f"Answer number {i} is short." for i in range(len(prompts))])
    data = tmp_path / "data.json"
    data.write_text(json.dumps([FACT] * 8))
    common = ["--data", str(data), "--model", str(tiny_llama), "--epochs", "6", "--batch-size", "2",
              "--learning-rate", "1e-2"] + (["--packing"] if packing else [])
    assert cli.main(common + ["--output", str(tmp_path / "plain"), "--rehearsal", "0"]) == 0
    assert "rehearsal examples" not in capsys.readouterr().err
    assert cli.main(common + ["--output", str(tmp_path / "rehearsed"), "--rehearsal", "4"]) == 0
    err = capsys.readouterr().err
    assert "rehearsal: 4 of the model's own answers" in err and "with 4 rehearsal examples" in err
    info = json.loads((tmp_path / "rehearsed" / "chatkit.json").read_text())
    assert info["options"]["rehearsal"] == 4
    pairs = [(c[0]["content"], c[1]["content"]) for c in info["rehearsal"]]
    assert [answer for _, answer in pairs] == [f"Answer number {i} is short." for i in range(4)]
    assert len({prompt for prompt, _ in pairs}) == 4 and all(p in rehearsal.GENERAL_PROMPTS for p, _ in pairs)
    base, tokenizer = load(tiny_llama)
    reference = [answer_logprobs(base, tokenizer, *pair) for pair in pairs]

    def drift(name):
        model = load(tmp_path / name)[0]
        return sum(float((ref.exp() * (ref - answer_logprobs(model, tokenizer, *pair))).sum(-1).mean())
                   for pair, ref in zip(pairs, reference)) / len(pairs)

    plain, rehearsed = drift("plain"), drift("rehearsed")
    assert plain > 0.05
    # Packed, the eight facts and four rehearsal examples share one sequence: six updates in all, so
    # the pull back is smaller, but it must still be there.
    assert rehearsed < (0.95 if packing else 0.5) * plain


def test_full_forward_path_gives_the_same_loss_as_the_fast_path(tiny_llama, monkeypatch, tmp_path):
    """Distributed runs and soft-capped models take the model's full forward; the loss must not change."""
    from datasets import Dataset
    from transformers import TrainingArguments

    model, tokenizer = load(tiny_llama)
    conversations = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
                     for i in range(3)]
    user = tokenize_examples(conversations[:2], tokenizer, 1024)
    rehearsed = tokenize_examples(conversations[2:], tokenizer, 1024)
    teacher = rehearsal.attach_teacher(model, rehearsed)
    for example in user:
        example["teacher_index"] = [-1] * len(example["input_ids"])
    with torch.no_grad():  # move the model away from the teacher, so the rehearsal term is not zero
        model.get_output_embeddings().weight.mul_(1.2)
    batch = PaddingCollator(tokenizer.pad_token_id)(user + rehearsed)
    trainer = ChatTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
                          train_dataset=Dataset.from_list(user))
    trainer.teacher = teacher
    fast = float(trainer.compute_loss(model, dict(batch)))
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    full = float(trainer.compute_loss(model, dict(batch)))
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    taught = int((batch["teacher_index"] >= 0).sum())
    assert 0 < taught < labelled
    assert full == pytest.approx(fast, rel=1e-5) and fast > 0

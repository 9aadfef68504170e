"""convert_chatgpt_export.py --preferences: preference pairs from regenerations and thumbs, checked exactly."""

from __future__ import annotations

import json

import pytest

import convert_chatgpt_export as cli
from export_builder import Tree, message, simple, write_json, write_zip


def regenerated_tree():
    """Q -> A1 (left), A2 (the user went on: Q2 -> B); an edit of Q (Q') answered by C."""
    tree = Tree()
    q = tree.add(message("user", "What is the capital of France?"))
    tree.add(message("assistant", "France is a country in Europe."), parent=q)
    a2 = tree.add(message("assistant", "Paris. Anything else?"), parent=q)
    q2 = tree.add(message("user", "And of Spain?"), parent=a2)
    tree.add(message("assistant", "Madrid."), parent=q2)
    edited = tree.add(message("user", "What is the capital of Italy?"), parent=tree.root)
    tree.add(message("assistant", "Rome."), parent=edited)
    return tree.conversation("regen", current=_key(tree, "Madrid."))


def _key(tree: Tree, text: str) -> str:
    return next(k for k, n in tree.mapping.items() if (n.get("message") or {}).get("content", {}).get("parts") == [text])


def thumbs_tree():
    """Q -> D (thumbs down), E (regenerated, on the path); R -> F (thumbs up, alone)."""
    tree = Tree()
    q = tree.add(message("user", "Write a haiku about rain."))
    down = message("assistant", "Rain is wet.")
    tree.add(down, parent=q)
    tree.add(message("assistant", "Soft rain on the roof,\nthe garden drinks in silence,\nclouds forget the sun."),
             parent=q)
    r = tree.add(message("user", "Thanks! One about snow?"))
    up = message("assistant", "White hush on the hills.")
    tree.add(up, parent=r)
    return tree.conversation("thumbs"), down["id"], up["id"]


def convert(tmp_path, conversations, *flags, feedback=None, zipped=True):
    members = {"conversations.json": conversations}
    if feedback is not None:
        members["message_feedback.json"] = feedback
    if zipped:
        source = write_zip(tmp_path / "export.zip", members)
    else:
        folder = tmp_path / "export"
        folder.mkdir()
        for name, data in members.items():
            write_json(folder / name, data)
        source = folder
    assert cli.main([str(source), str(tmp_path / "out.jsonl"), "--preferences", str(tmp_path / "prefs.jsonl"),
                     "--quiet", *flags]) == 0
    read = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    return (read("prefs.jsonl") if (tmp_path / "prefs.jsonl").exists() else [],
            read("prefs-labelled.jsonl") if (tmp_path / "prefs-labelled.jsonl").exists() else [])


def test_a_regeneration_the_user_went_on_from_is_chosen_and_an_edit_gives_nothing(tmp_path):
    pairs, labelled = convert(tmp_path, [regenerated_tree()])
    assert pairs == [{"prompt": [{"role": "user", "content": "What is the capital of France?"}],
                      "chosen": [{"role": "assistant", "content": "Paris. Anything else?"}],
                      "rejected": [{"role": "assistant", "content": "France is a country in Europe."}]}]
    assert labelled == []
    # the training records are the current branch only, as without --preferences
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [m["content"] for m in records[0]["messages"]] == [
        "What is the capital of France?", "Paris. Anything else?", "And of Spain?", "Madrid."]


@pytest.mark.parametrize("spelling", ["camel", "snake"])
def test_thumbs_in_both_spellings(tmp_path, spelling):
    conversation, down, up = thumbs_tree()
    if spelling == "camel":
        feedback = [{"id": "f1", "conversation_id": "thumbs", "message_id": down, "rating": "thumbsDown",
                     "text": "too short"}, {"id": "f2", "conversation_id": "thumbs", "message_id": up,
                                            "rating": "thumbsUp"}]
    else:
        feedback = [{"conversation_id": "thumbs", "id": down, "rating": "thumbs_down"},
                    {"conversation_id": "thumbs", "id": up, "rating": "thumbs_up"}]
    pairs, labelled = convert(tmp_path, [conversation], feedback=feedback, zipped=spelling == "camel")
    assert pairs == [{"prompt": [{"role": "user", "content": "Write a haiku about rain."}],
                      "chosen": [{"role": "assistant", "content": "Soft rain on the roof,\nthe garden drinks in "
                                                                  "silence,\nclouds forget the sun."}],
                      "rejected": [{"role": "assistant", "content": "Rain is wet."}]}]
    assert labelled == [{"prompt": [{"role": "user", "content": "Write a haiku about rain."},
                                    {"role": "assistant", "content": "Soft rain on the roof,\nthe garden drinks in "
                                                                     "silence,\nclouds forget the sun."},
                                    {"role": "user", "content": "Thanks! One about snow?"}],
                         "completion": [{"role": "assistant", "content": "White hush on the hills."}],
                         "label": True}]


def test_custom_instructions_and_redaction_reach_the_prompt(tmp_path):
    conversation = regenerated_tree()
    conversation["mapping"]["ci"] = {"id": "ci", "parent": None, "children": [], "message": {
        "id": "ci-m", "author": {"role": "user"}, "content": {
            "content_type": "user_editable_context", "user_profile": "I live in Lyon, mail me at me@example.com.",
            "user_instructions": "Be brief."}, "metadata": {"is_visually_hidden_from_conversation": True}}}
    pairs, _ = convert(tmp_path, [conversation], "--custom-instructions", "--redact")
    assert pairs[0]["prompt"][0] == {"role": "system", "content": "I live in Lyon, mail me at [EMAIL].\n\nBe brief."}
    record = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert record["messages"][0] == pairs[0]["prompt"][0]  # the training records' custom instructions too


def test_an_export_without_regenerations_or_thumbs_says_so_and_writes_nothing(tmp_path, capsys):
    pairs, labelled = convert(tmp_path, [simple("a", ("user", "Hi"), ("assistant", "Hello!"))])
    assert pairs == labelled == [] and not (tmp_path / "prefs.jsonl").exists()
    assert "no regenerated answer" in capsys.readouterr().err and (tmp_path / "out.jsonl").exists()


def test_preferences_refusals(tmp_path, capsys):
    source = write_json(tmp_path / "conversations.json", [regenerated_tree()])
    (tmp_path / "prefs.jsonl").write_text("keep")
    with pytest.raises(SystemExit):
        cli.main([str(source), str(tmp_path / "out.jsonl"), "--preferences", str(tmp_path / "prefs.jsonl")])
    assert "--preferences" in capsys.readouterr().err and (tmp_path / "prefs.jsonl").read_text() == "keep"
    with pytest.raises(SystemExit):
        cli.main([str(source), str(tmp_path / "out.jsonl"), "--preferences", str(tmp_path / "out.jsonl")])
    assert "names OUTPUT itself" in capsys.readouterr().err


# The preference rule, for every combination of thumbs on two sibling answers and of the branch the user
# went on from. Expected pairs, as (chosen, rejected, source); A and B are the two answers.
RULE = {
    # (A's thumbs, B's thumbs, went on from): pairs
    (None, None, "A"): [("A", "B", "regeneration")],
    (None, None, "B"): [("B", "A", "regeneration")],
    (None, None, "neither"): [],
    (None, None, "both"): [],
    ("up", None, "A"): [("A", "B", "regeneration")],
    ("up", None, "B"): [],  # liked A, went on from B: no answer is judged worse
    ("up", None, "neither"): [],
    ("up", None, "both"): [],
    ("down", None, "A"): [("B", "A", "thumbs")],  # went on from A but disliked it
    ("down", None, "B"): [("B", "A", "thumbs")],
    ("down", None, "neither"): [("B", "A", "thumbs")],
    ("down", None, "both"): [("B", "A", "thumbs")],
    ("up", "up", "A"): [],
    ("up", "up", "B"): [],
    ("up", "up", "neither"): [],
    ("up", "up", "both"): [],
    ("up", "down", "A"): [("A", "B", "thumbs")],
    ("up", "down", "B"): [("A", "B", "thumbs")],
    ("up", "down", "neither"): [("A", "B", "thumbs")],
    ("up", "down", "both"): [("A", "B", "thumbs")],
    ("down", "down", "A"): [],
    ("down", "down", "B"): [],
    ("down", "down", "neither"): [],
    ("down", "down", "both"): [],
}


def _mirror(rating_a, rating_b, went):
    """The same case with the answers' names swapped."""
    swap = {"A": "B", "B": "A"}
    pairs = RULE[(rating_b, rating_a, swap.get(went, went))]
    return [(swap[c], swap[r], source) for c, r, source in pairs]


def rule_case(rating_a, rating_b, went):
    """Q -> A, B (each followed by a user turn when the user went on from it); an edit of Q ends elsewhere."""
    tree = Tree()
    q = tree.add(message("user", "Name a colour."))
    answers = {"A": message("assistant", "Blue."), "B": message("assistant", "Green.")}
    keys = {name: tree.add(msg, parent=q) for name, msg in answers.items()}
    ends = {name: tree.chain(("user", f"Why {name}?"), ("assistant", "Because."), parent=keys[name])
            for name in "AB" if went in (name, "both")}
    elsewhere = tree.chain(("user", "Name a number."), ("assistant", "Seven."), parent=tree.root)
    current = ends.get("A") or ends.get("B") or elsewhere
    feedback = [{"conversation_id": "rule", "message_id": answers[name]["id"],
                 "rating": {"up": "thumbsUp", "down": "thumbsDown"}[rating]}
                for name, rating in (("A", rating_a), ("B", rating_b)) if rating]
    return tree.conversation("rule", current=current), feedback


@pytest.mark.parametrize("rating_a", [None, "up", "down"])
@pytest.mark.parametrize("rating_b", [None, "up", "down"])
@pytest.mark.parametrize("went", ["A", "B", "neither", "both"])
def test_the_preference_rule_for_every_combination_of_thumbs_and_branches(tmp_path, rating_a, rating_b, went):
    expected = RULE.get((rating_a, rating_b, went))
    if expected is None:
        expected = _mirror(rating_a, rating_b, went)
    conversation, feedback = rule_case(rating_a, rating_b, went)
    pairs, _ = convert(tmp_path, [conversation], feedback=feedback)
    text = {"Blue.": "A", "Green.": "B"}
    got = [(text[p["chosen"][0]["content"]], text[p["rejected"][0]["content"]]) for p in pairs
           if p["prompt"] == [{"role": "user", "content": "Name a colour."}]]
    assert got == [(c, r) for c, r, _ in expected]
    # what the rule promises whatever the case: never a thumbed-down answer chosen, never a thumbed-up one
    # rejected, never an answer the user went on from (and did not thumb down) rejected
    rating = {"A": rating_a, "B": rating_b}
    for chosen, rejected in got:
        assert rating[chosen] != "down" and rating[rejected] != "up"
        assert not (went in (rejected, "both") and rating[rejected] != "down")



def test_the_files_beside_the_output_follow_the_output_rule(tmp_path, capsys):
    """The rated answers' file is never written over a file of the user's, nor OUTPUT over it, nor any output
    over the export being read, --overwrite or not."""
    conversation, down, up = thumbs_tree()
    source = write_json(tmp_path / "conversations.json", [conversation])
    write_json(tmp_path / "message_feedback.json", [{"message_id": up, "rating": "thumbsUp"}])
    mine = tmp_path / "prefs-labelled.jsonl"
    mine.write_text("my own notes\n")
    args = [str(source), str(tmp_path / "out.jsonl"), "--preferences", str(tmp_path / "prefs.jsonl")]
    assert cli.main(args) == 1
    assert "prefs-labelled.jsonl (the rated answers' file beside --preferences) exists already" in \
        capsys.readouterr().err
    assert mine.read_text() == "my own notes\n" and not (tmp_path / "out.jsonl").exists()
    assert cli.main([str(source), str(mine), "--preferences", str(tmp_path / "prefs.jsonl"), "--overwrite"]) == 1
    assert "name the same file" in capsys.readouterr().err and mine.read_text() == "my own notes\n"
    for named in (source, tmp_path / "message_feedback.json"):
        before = named.read_bytes()
        assert cli.main([str(source), str(tmp_path / "o.jsonl"), "--preferences", str(named), "--overwrite"]) == 1
        assert "--preferences is also an INPUT" in capsys.readouterr().err and named.read_bytes() == before
    assert cli.main(args + ["--overwrite"]) == 0
    assert json.loads(mine.read_text())["label"] is True

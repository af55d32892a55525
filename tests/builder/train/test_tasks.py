"""The device-command task: generator, splits, scorer, user JSONL, and `slmops builder task`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmops_builder.cli import app
from slmops_builder.train.actions import parse_action, score, target_text
from slmops_builder.train.examples import DatasetError, load_jsonl
from slmops_builder.train.tasks import SPLITS, TEMPLATES, generate_splits, number_words


def test_splits_are_disjoint_by_template_and_cover_every_intent() -> None:
    splits = generate_splits(600, 150, 150, seed=7)
    assert [len(splits.split(s)) for s in SPLITS] == [600, 150, 150]
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not splits.templates[a] & splits.templates[b], (a, b)
    for name in SPLITS:
        used = {ex.template for ex in splits.split(name)}
        assert used <= splits.templates[name]
        assert {t.split(":")[0] for t in used} == set(TEMPLATES)  # every intent in every split
    train_inputs = {ex.input for ex in splits.train}
    assert not train_inputs & {ex.input for ex in splits.test}


def test_generator_is_deterministic_and_varied() -> None:
    a, b, c = generate_splits(300, 50, 50, seed=1), generate_splits(300, 50, 50, seed=1), generate_splits(300, 50, 50)
    assert [e.to_json() for e in a.train] == [e.to_json() for e in b.train]
    assert [e.input for e in a.train] != [e.input for e in c.train]
    actions = [json.loads(e.output) for e in a.train]
    assert {x["action"] for x in actions} == {
        "on",
        "off",
        "set",
        "open",
        "close",
        "lock",
        "unlock",
        "none",
        "unsupported",
    }
    assert any("delay_s" in x for x in actions) and any("temperature" in x for x in actions)
    assert any("level" in x for x in actions)
    assert len({e.input for e in a.train}) == 300
    # every output is canonical: parse and re-render gives the same text
    assert all(target_text(json.loads(e.output)) == e.output for e in a.train)


def test_generated_examples_say_what_they_mean() -> None:
    examples = generate_splits(2000, 10, 10, seed=2).train
    for ex in examples:
        action = json.loads(ex.output)
        text = ex.input.lower()
        if "level" in action and "percent" not in text and "%" not in text:
            assert str(action["level"]) in text
        if "level" in action and "percent" in text and str(action["level"]) not in text:
            assert number_words(action["level"]) in text
        if action["action"] == "set" and action.get("device") == "thermostat":
            t = action["temperature"]
            assert str(t) in text or number_words(t) in text
    spelled = [e for e in examples if "delay_s" in json.loads(e.output) and "half an hour" in e.input]
    assert all(json.loads(e.output)["delay_s"] == 1800 for e in spelled)


def test_number_words() -> None:
    assert [number_words(n) for n in (0, 7, 13, 20, 45, 90, 100)] == [
        "zero",
        "seven",
        "thirteen",
        "twenty",
        "forty five",
        "ninety",
        "one hundred",
    ]


def test_score_exact_and_field_level() -> None:
    ref = ['{"action": "set", "device": "light", "room": "kitchen", "level": 30}', '{"action": "none"}']
    assert score(ref, ref).exact == 2
    s = score(['{"action": "set", "device": "light", "room": "bedroom", "level": 30}', "sure! none"], ref)
    assert s.exact == 0 and s.valid_json == 1
    assert s.field_accuracy == pytest.approx((3 / 4 + 0) / 2)
    # key order and surrounding text do not matter; extra keys do
    s = score(['Here: {"level": 30, "room": "kitchen", "device": "light", "action": "set"}'], ref[:1])
    assert s.exact == 1
    s = score(['{"action": "none", "delay_s": 5}'], ref[1:])
    assert s.exact == 0 and s.field_accuracy == pytest.approx(0.5)
    assert parse_action("[1, 2]") is None and parse_action("{broken") is None
    with pytest.raises(ValueError, match="2 predictions for 1"):
        score(["a", "b"], ["a"])


def test_load_jsonl_both_formats(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    rows = [
        {"input": "lights on", "output": {"action": "on", "device": "light"}},
        {"input": "fan off", "output": '{"action": "off", "device": "fan"}'},
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "lock up"},
                {"role": "assistant", "content": '{"action": "lock", "device": "lock"}'},
            ]
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps(r) for r in rows[2:]) + "\n")
    examples = load_jsonl(path) + load_jsonl(chats)
    assert [e.input for e in examples] == ["lights on", "fan off", "lock up"]
    assert examples[0].output == '{"action": "on", "device": "light"}'
    assert examples[0].messages[0]["role"] == "user"  # no system prompt unless one is given
    assert examples[2].prompt_messages[0] == {"role": "system", "content": "be brief"}


def test_a_given_system_prompt_goes_to_the_records_without_one(tmp_path: Path) -> None:
    chats = tmp_path / "chats.jsonl"
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "where is Paris?"},
        {"role": "assistant", "content": "France"},
    ]
    own = [{"role": "system", "content": "be brief"}, *turns[2:]]
    chats.write_text(json.dumps({"messages": turns}) + "\n" + json.dumps({"messages": own}) + "\n")
    multi, kept = load_jsonl(chats, system="Answer with a country.")
    assert multi.prompt_messages == [{"role": "system", "content": "Answer with a country."}, *turns[:3]]
    assert multi.output == "France" and multi.input == "where is Paris?"
    assert kept.prompt_messages[0] == {"role": "system", "content": "be brief"}
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"input": "where is Rome?", "output": "Italy"}) + "\n")
    (pair,) = load_jsonl(pairs, system="Answer with a country.")
    assert pair.prompt_messages == [
        {"role": "system", "content": "Answer with a country."},
        {"role": "user", "content": "where is Rome?"},
    ]


def test_a_file_that_mixes_formats_is_refused_with_the_line(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    chat = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    lines = ["", json.dumps({"input": "a", "output": "b"}), json.dumps(chat), json.dumps({"input": "c", "output": "d"})]
    lines.append(json.dumps(chat))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as info:
        load_jsonl(path)
    assert [n for n, _ in info.value.problems] == [3, 5]
    assert "line 3: a messages record, but line 2 is input/output: one format per file" in str(info.value)


def test_bad_jsonl_lists_every_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"input": "ok", "output": "fine"}),
        "{not json",
        json.dumps({"input": "no output"}),
        json.dumps({"input": "good", "output": "also fine"}),
        json.dumps([1, 2]),
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as info:
        load_jsonl(path)
    assert [n for n, _ in info.value.problems] == [2, 3, 5]
    assert "line 2: not JSON" in str(info.value) and "line 3: needs 'input' and 'output'" in str(info.value)
    chats = tmp_path / "chats.jsonl"
    lines = [
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
    ]
    chats.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as info:
        load_jsonl(chats)
    msg = str(info.value)
    assert "line 1: the last message must be the assistant's answer" in msg
    assert "line 2: messages[0] has unknown role 'robot'" in msg
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="no records"):
        load_jsonl(tmp_path / "empty.jsonl")


def test_cli_task_and_bad_data_exit(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["task", "--out", str(tmp_path / "d"), "--train", "40", "--validation", "10",
                                 "--test", "10", "--seed", "3", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["splits"]["train"]["examples"] == 40
    assert len(load_jsonl(tmp_path / "d" / "test.jsonl")) == 10
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "x"}\n')
    result = runner.invoke(app, ["finetune", "-m", str(tmp_path), "-d", str(bad), "-o", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "line 1: needs 'input' and 'output', or 'messages'" in result.output

"""The task's scorers and validity rules against hand-computed values, and the settings they refuse."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from slmops_builder.train.scoring import TaskSpec, rouge_l, token_f1, tokens


def test_tokens_are_lowercased_words_and_numbers() -> None:
    assert tokens("Paris, France! It's 20°C_now") == ["paris", "france", "it", "s", "20", "c", "now"]


def test_token_f1_against_hand_computed_values() -> None:
    # 3 common tokens; precision 3/3, recall 3/6: F1 = 2 * 1 * 0.5 / 1.5
    assert token_f1("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert token_f1("Paris, France!", "paris") == pytest.approx(2 / 3)  # P 1/2, R 1
    assert token_f1("the the the", "the cat") == pytest.approx(0.4)  # common 1 (clipped): P 1/3, R 1/2
    assert token_f1("a b c d", "d c b a") == 1.0  # order does not count
    assert token_f1("Rome", "Paris") == 0.0
    assert (token_f1("", ""), token_f1("x", ""), token_f1("", "x")) == (1.0, 0.0, 0.0)


def test_rouge_l_against_hand_computed_values() -> None:
    # LCS "the cat was under the bed" (6 tokens): P 6/7, R 6/6, F1 = 12/13
    assert rouge_l("the cat was found under the bed", "the cat was under the bed") == pytest.approx(12 / 13)
    assert rouge_l("a b c d", "d c b a") == pytest.approx(0.25)  # LCS 1: order counts, unlike F1
    assert rouge_l("a x b y c", "a b c") == pytest.approx(2 * 0.6 * 1 / 1.6)  # LCS 3: P 3/5, R 1
    assert (rouge_l("", ""), rouge_l("x", ""), rouge_l("Rome", "Paris")) == (1.0, 0.0, 0.0)


def test_each_scorer_on_one_answer() -> None:
    cases = {
        "json": ('{"action": "on"}', '{"action":"on"}', 1.0),
        "exact": (" Paris ", "Paris", 1.0),
        "contains": ("It is Paris.", "paris", 1.0),
        "f1": ("I think Rome", "Rome", 0.5),
        "rouge_l": ("I think Rome", "Rome", 0.5),
    }
    for scorer, (answer, reference, want) in cases.items():
        assert TaskSpec(scorer=scorer).example_score(answer, reference) == pytest.approx(want), scorer  # type: ignore[arg-type]
    assert TaskSpec(scorer="exact").example_score("paris", "Paris") == 0.0
    assert TaskSpec(scorer="contains").example_score("Rome", "Paris") == 0.0
    regex = TaskSpec(scorer="regex", pattern=r"[A-Z][a-z]+")
    assert (regex.example_score(" Paris ", "unused"), regex.example_score("Paris is", "unused")) == (1.0, 0.0)


def test_validity_rules_and_their_defaults() -> None:
    assert (TaskSpec().rule, TaskSpec(scorer="f1").rule, TaskSpec(scorer="regex", pattern="x").rule) == (
        "json",
        "text",
        "regex",
    )
    as_json = TaskSpec()
    assert as_json.is_valid('sure: {"action": "on"}') and not as_json.is_valid("not json")
    text = TaskSpec(scorer="f1", max_chars=5)
    assert text.is_valid(" Paris ") and not text.is_valid("Parisian") and not text.is_valid("  ")
    regex = TaskSpec(scorer="f1", valid="regex", pattern=r"\w+")
    assert regex.is_valid("Paris") and not regex.is_valid("two words")


def test_score_averages_and_counts() -> None:
    s = TaskSpec(scorer="f1").score(["Paris", "I think Rome", ""], ["Paris", "Rome", "Oslo"])
    assert s["scorer"] == "f1" and s["n"] == 3
    assert s["score"] == pytest.approx(round((1.0 + 0.5 + 0.0) / 3, 4))
    assert (s["exact"], s["valid"]) == (1, 2)  # the empty answer is not valid text
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        TaskSpec().score(["a", "b"], ["a"])


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValidationError, match="need a pattern"):
        TaskSpec(scorer="regex")
    with pytest.raises(ValidationError, match="need a pattern"):
        TaskSpec(scorer="f1", valid="regex")
    with pytest.raises(ValidationError, match="not a regular expression"):
        TaskSpec(scorer="regex", pattern="(")
    with pytest.raises(ValidationError, match="the system prompt is empty"):
        TaskSpec(system="  ")
    with pytest.raises(ValidationError):
        TaskSpec(scorer="bleu")  # type: ignore[arg-type]

"""A task beyond its data: the system prompt, how answers are scored, and which teacher answers count.

`TaskSpec.scorer` gives each answer a score in [0, 1] against its reference; a task's score is their mean:

- "json"      the first JSON object of the answer equals the reference's (a reference that is not
              JSON: the stripped texts are equal); the device-command task's exact match
- "exact"     the stripped texts are equal
- "contains"  the reference's text occurs in the answer (case-insensitive, stripped)
- "regex"     the stripped answer matches `pattern` in full (the reference is not used)
- "f1"        token-level F1 (SQuAD style): tokens are the lowercased runs of letters and digits, the
              overlap counts each common token as often as both sides have it
- "rouge_l"   ROUGE-L F1 over the same tokens: the longest common subsequence LCS,
              precision LCS/|answer|, recall LCS/|reference|, F1 their harmonic mean

`TaskSpec.valid` is the rule that keeps a teacher's answer for the student (distillation), and is
counted for every evaluated answer: "json" (parses as a JSON object), "regex" (matches `pattern` in
full), "text" (non-empty and at most `max_chars` characters). Left out, it follows the scorer:
"json" for json, "regex" for regex, "text" otherwise.
`system` is the system prompt `examples.load_jsonl` gives the records that have none.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slmops_builder.train.actions import parse_action, score

__all__ = ["SCORERS", "VALIDITY_RULES", "TaskSpec", "rouge_l", "token_f1", "tokens"]

Scorer = Literal["json", "exact", "contains", "regex", "f1", "rouge_l"]
Validity = Literal["json", "regex", "text"]
SCORERS: tuple[str, ...] = ("json", "exact", "contains", "regex", "f1", "rouge_l")
VALIDITY_RULES: tuple[str, ...] = ("json", "regex", "text")

_TOKEN = re.compile(r"[^\W_]+")


def tokens(text: str) -> list[str]:
    """The lowercased runs of letters and digits of `text` (punctuation and spaces separate them)."""
    return _TOKEN.findall(text.lower())


def token_f1(answer: str, reference: str) -> float:
    """Token-level F1 of `answer` against `reference` (both empty: 1.0; one empty: 0.0)."""
    got, want = tokens(answer), tokens(reference)
    if not got or not want:
        return float(got == want)
    common = sum((Counter(got) & Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b, start=1):
            row.append(prev[j - 1] + 1 if x == y else max(prev[j], row[j - 1]))
        prev = row
    return prev[-1]


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 of `answer` against `reference` over `tokens` (both empty: 1.0; one empty: 0.0)."""
    got, want = tokens(answer), tokens(reference)
    if not got or not want:
        return float(got == want)
    lcs = _lcs(got, want)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(got), lcs / len(want)
    return 2 * precision * recall / (precision + recall)


class TaskSpec(BaseModel):
    """The system prompt, scorer and validity rule of a task (see the module doc)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system: str | None = Field(default=None, description="system prompt for records without one")
    scorer: Scorer = "json"
    valid: Validity | None = Field(default=None, description="teacher answers kept (None: follows the scorer)")
    pattern: str | None = Field(default=None, description="the regex of the regex scorer and validity rule")
    max_chars: int = Field(default=2000, ge=1, description="the longest answer the text rule accepts")

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        if self.system is not None and not self.system.strip():
            raise ValueError("the system prompt is empty")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern {self.pattern!r} is not a regular expression: {exc}") from None
        if self.pattern is None and "regex" in (self.scorer, self.rule):
            raise ValueError("the regex scorer and validity rule need a pattern")
        return self

    @property
    def rule(self) -> Validity:
        """The validity rule in force (`valid`, else the one its scorer implies)."""
        if self.valid is not None:
            return self.valid
        return "json" if self.scorer == "json" else "regex" if self.scorer == "regex" else "text"

    def is_valid(self, answer: str) -> bool:
        """Whether `answer` passes the validity rule."""
        rule = self.rule
        if rule == "json":
            return parse_action(answer) is not None
        if rule == "regex":
            return re.fullmatch(str(self.pattern), answer.strip(), re.DOTALL) is not None
        return 0 < len(answer.strip()) <= self.max_chars

    def example_score(self, answer: str, reference: str) -> float:
        """One answer's score in [0, 1] against its reference."""
        kind = self.scorer
        if kind == "json":
            return float(score([answer], [reference]).exact)
        if kind == "exact":
            return float(answer.strip() == reference.strip())
        if kind == "contains":
            return float(reference.strip().lower() in answer.lower())
        if kind == "regex":
            return float(re.fullmatch(str(self.pattern), answer.strip(), re.DOTALL) is not None)
        return token_f1(answer, reference) if kind == "f1" else rouge_l(answer, reference)

    def score(self, answers: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
        """The task's score (mean of `example_score`), with the exact matches, JSON validity and
        field accuracy of `actions.score` and the count of answers passing the validity rule."""
        base = score(list(answers), list(references)).to_json()  # checks the lengths
        scores = [self.example_score(a, r) for a, r in zip(answers, references, strict=True)]
        return {
            "scorer": self.scorer,
            "score": round(sum(scores) / len(scores), 4) if scores else 0.0,
            **base,
            "valid": sum(self.is_valid(a) for a in answers),
        }

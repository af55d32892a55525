"""The device-command task's answer: one JSON action, its canonical text, and how answers are scored.

`target_text` writes an action with its keys in schema order (`KEY_ORDER`, see `tasks`); `score`
gives exact match (parsed JSON equal), field accuracy and JSON validity of a model's answers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["KEY_ORDER", "SYSTEM_PROMPT", "Score", "parse_action", "score", "target_text"]

SYSTEM_PROMPT = "Turn the smart-home command into one JSON action."
KEY_ORDER = ("action", "device", "room", "level", "temperature", "delay_s")


def target_text(action: dict[str, Any]) -> str:
    """The canonical JSON text of an action (keys in schema order, compact)."""
    ordered = {k: action[k] for k in KEY_ORDER if k in action}
    ordered.update({k: v for k, v in action.items() if k not in ordered})
    return json.dumps(ordered, separators=(", ", ": "))


_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def parse_action(text: str) -> dict[str, Any] | None:
    """The first JSON object in a model's output, or None when there is none."""
    text = text.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        match = _JSON_OBJECT.search(text)
        if match is None:
            return None
        try:
            value = json.loads(match.group(0))
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class Score:
    n: int
    exact: int
    valid_json: int
    field_accuracy: float

    @property
    def exact_match(self) -> float:
        return self.exact / self.n if self.n else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "exact": self.exact,
            "exact_match": round(self.exact_match, 4),
            "valid_json": self.valid_json,
            "field_accuracy": round(self.field_accuracy, 4),
        }


def score(predictions: Sequence[str], references: Sequence[str]) -> Score:
    """Exact match: both parse and are equal (or, when the reference is not JSON, the stripped texts
    are equal). Field accuracy: per example, matching keys / keys in either, averaged."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    exact = valid = 0
    fields = 0.0
    for pred, ref in zip(predictions, references, strict=True):
        got, want = parse_action(pred), parse_action(ref)
        if got is not None:
            valid += 1
        if want is None:
            ok = pred.strip() == ref.strip()
            exact += ok
            fields += float(ok)
            continue
        if got == want:
            exact += 1
        keys = set(want) | set(got or {})
        fields += sum(1 for k in keys if got is not None and k in got and k in want and got[k] == want[k]) / len(keys)
    n = len(references)
    return Score(n, exact, valid, fields / n if n else 0.0)

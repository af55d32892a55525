"""Chat examples: one exchange ending with the assistant's answer (the training target), and user data.

`load_jsonl` reads a user's JSONL file (`{"input": ..., "output": ...}` or `{"messages": [...]}` per
line, one format per file; multi-turn messages allowed), refusing it with every bad line named (a
line in the other format than the first record's among them); the given system prompt goes to every
record without one of its own (none by default); `write_jsonl` writes examples; `dataset_sha256` is the
hash a run's lineage records for its data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmops_builder.train.actions import SYSTEM_PROMPT, target_text

__all__ = ["DatasetError", "Example", "dataset_sha256", "load_jsonl", "write_jsonl"]


class DatasetError(ValueError):
    """Bad records in a user's JSONL file: every bad line, with its number and what is wrong."""

    def __init__(self, path: Path, problems: Sequence[tuple[int, str]]) -> None:
        self.path = path
        self.problems = list(problems)
        shown = "; ".join(f"line {n}: {why}" for n, why in self.problems[:20])
        more = f"; and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(f"{path}: {len(self.problems)} bad record(s): {shown}{more}")


@dataclass(frozen=True)
class Example:
    """One chat exchange: `messages` ends with the assistant's answer (the training target)."""

    messages: tuple[dict[str, str], ...]
    template: str = ""

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        return [dict(m) for m in self.messages[:-1]]

    @property
    def input(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    @property
    def output(self) -> str:
        return self.messages[-1]["content"]

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"messages": [dict(m) for m in self.messages]}
        if self.template:
            data["template"] = self.template
        return data

    @classmethod
    def from_pair(cls, user: str, answer: str, *, system: str | None = SYSTEM_PROMPT, template: str = "") -> Example:
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
        return cls(tuple(msgs), template)


_ROLES = frozenset({"system", "user", "assistant"})


def _format(raw: Any) -> str | None:
    """The record's format ("messages" or "input/output"), None for neither."""
    if isinstance(raw, dict):
        if "messages" in raw:
            return "messages"
        if "input" in raw or "output" in raw:
            return "input/output"
    return None


def _record(raw: Any, system: str | None) -> Example:
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    if "messages" in raw:
        msgs = raw["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        clean: list[dict[str, str]] = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] needs string 'role' and 'content'")
            if m["role"] not in _ROLES:
                raise ValueError(f"messages[{i}] has unknown role {m['role']!r}")
            clean.append({"role": m["role"], "content": m["content"]})
        if clean[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's answer")
        if not any(m["role"] == "user" for m in clean):
            raise ValueError("no user message")
        if not clean[-1]["content"].strip():
            raise ValueError("the assistant's answer is empty")
        if system and clean[0]["role"] != "system":
            clean.insert(0, {"role": "system", "content": system})
        return Example(tuple(clean), str(raw.get("template", "")))
    if "input" in raw and "output" in raw:
        user, answer = raw["input"], raw["output"]
        if not isinstance(user, str) or not user.strip():
            raise ValueError("'input' must be a non-empty string")
        if isinstance(answer, dict):
            answer = target_text(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError("'output' must be a non-empty string or a JSON object")
        return Example.from_pair(user, answer, system=system)
    raise ValueError("needs 'input' and 'output', or 'messages'")


def load_jsonl(path: Path, *, system: str | None = None) -> list[Example]:
    """Read a JSONL file of examples, `system` given to those without a system prompt; raises
    DatasetError listing every bad line (1-based)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    examples: list[Example] = []
    problems: list[tuple[int, str]] = []
    first: tuple[int, str] | None = None  # the line and format of the first record
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as exc:
            raise DatasetError(path, [(0, f"not UTF-8 text ({exc.reason})")]) from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append((number, f"not JSON ({exc.msg} at column {exc.colno})"))
            continue
        kind = _format(raw)
        if kind is not None and first is None:
            first = (number, kind)
        elif kind is not None and first is not None and kind != first[1]:
            problems.append((number, f"a {kind} record, but line {first[0]} is {first[1]}: one format per file"))
            continue
        try:
            examples.append(_record(raw, system))
        except ValueError as exc:
            problems.append((number, str(exc)))
    if problems:
        raise DatasetError(path, problems)
    if not examples:
        raise DatasetError(path, [(0, "no records")])
    return examples


def write_jsonl(examples: Iterable[Example], path: Path) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n


def dataset_sha256(examples: Iterable[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(ex.to_json(), sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()

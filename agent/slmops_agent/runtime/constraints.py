"""Constrained decoding: a request's output held to a JSON schema, a regular expression or a Lark
grammar by onnxruntime-genai's guidance (llguidance masks every token the constraint forbids, and
the generation ends where the constraint is complete).

Checked twice before any token: here at submission (size, JSON syntax, the schema's shape), and
when the model compiles it at the request's start (llguidance's own checks: unknown schema
keywords or types, a regex or grammar that does not parse); either refusal is INVALID_ARGUMENT
naming the problem. A constraint mixes with batching (each Engine turn carries its own) and with
adapters (a lone generator)."""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass

from slmops_agent.errors import InvalidRequest


class ConstraintKind(enum.Enum):
    JSON_SCHEMA = "json_schema"
    REGEX = "regex"
    LARK_GRAMMAR = "lark_grammar"


@dataclass(frozen=True)
class Constraint:
    kind: ConstraintKind
    text: str
    origin: str = ""  # what the client sent, for errors ("tools", "response_format"); "": the kind's name

    @property
    def name(self) -> str:
        return self.origin or f"the {self.kind.value} constraint"


# OpenAI's `response_format: {"type": "json_object"}`: any JSON object
JSON_OBJECT_SCHEMA = '{"type": "object"}'
_GRAMMAR_PREFIX = "Error creating grammar: "


def check_constraint(constraint: Constraint, max_chars: int) -> None:
    """Refuse what can be told without the model: empty, too long, NUL, a schema that is not JSON
    or neither an object nor a boolean."""
    name = constraint.name
    text = constraint.text
    if not text.strip():
        raise InvalidRequest(f"{name} is empty")
    if len(text) > max_chars:
        raise InvalidRequest(f"{name} is {len(text)} characters; the limit is {max_chars}")
    if "\x00" in text:
        raise InvalidRequest(f"{name} has a NUL character")
    if constraint.kind is ConstraintKind.JSON_SCHEMA:
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{name} is not JSON: {exc}") from exc
        if not isinstance(schema, dict | bool):
            raise InvalidRequest(f"{name} must be a JSON object or boolean; got {type(schema).__name__}")


def guidance_refused(constraint: Constraint, exc: BaseException) -> InvalidRequest:
    """The model's compiler refused the constraint: one line naming the problem."""
    detail = re.sub(r"\s+", " ", str(exc).removeprefix(_GRAMMAR_PREFIX)).strip()
    if len(detail) > 300:
        detail = detail[:297] + "..."
    return InvalidRequest(f"{constraint.name} is invalid: {detail}")


def is_guidance_error(exc: BaseException) -> bool:
    return str(exc).startswith(_GRAMMAR_PREFIX)

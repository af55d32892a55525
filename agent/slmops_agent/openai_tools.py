"""Structured output on the OpenAI-compatible routes: `response_format` (`json_object`,
`json_schema`) and function calling (`tools`, `tool_choice`), each turned into one constraint of
`runtime.constraints`, so the answer parses and a call's arguments are valid under its function's
schema.

Function calling: the tools are described to the model in the system message, and the model calls
one as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the form SmolLM2 and Qwen were
trained on), held there by a Lark grammar. `auto` lets it answer text instead (any text not opening
with "<", so that a call is told from text by its first character; or the `response_format`'s
JSON); `required` and a named function make the call the whole answer. One call per answer
(`parallel_tool_calls` is not honoured). `strict: false` is treated as `strict: true`: the
schema always holds."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from slmops_agent.errors import InvalidRequest
from slmops_agent.runtime.constraints import JSON_OBJECT_SCHEMA, Constraint, ConstraintKind

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class _JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field("response", pattern=_NAME_PATTERN)
    description: str = ""
    schema_: dict[str, Any] | bool = Field(True, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchemaFormat | None = None


class _Function(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=_NAME_PATTERN)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: dict(_EMPTY_PARAMETERS))
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: _Function


class _Named(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: _Named


class _CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = ""
    type: Literal["function"] = "function"
    function: _CalledFunction


ToolChoice = Literal["none", "auto", "required"] | NamedChoice


@dataclass(frozen=True)
class Structure:
    """What a request's structured fields ask: its constraint, the system text describing its tools
    (empty: none), and whether the answer may be a tool call."""

    constraint: Constraint | None = None
    tools_prompt: str = ""
    calls: bool = False


def plan(response_format: ResponseFormat | None, tools: list[Tool] | None, tool_choice: ToolChoice | None) -> Structure:
    """Turn `response_format`, `tools` and `tool_choice` into one Structure (InvalidRequest for a
    combination that cannot hold)."""
    answer = _format_schema(response_format)
    if not tools:
        if tool_choice not in (None, "none"):
            raise InvalidRequest("tool_choice is set but tools is empty")
        kind = ConstraintKind.JSON_SCHEMA
        return Structure(Constraint(kind, answer, "response_format") if answer is not None else None)
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequest(f"tools: function names must be unique; got {', '.join(names)}")
    choice = tool_choice or "auto"
    if choice == "none":
        kind = ConstraintKind.JSON_SCHEMA
        return Structure(Constraint(kind, answer, "response_format") if answer is not None else None)
    if isinstance(choice, NamedChoice):
        if choice.function.name not in names:
            raise InvalidRequest(f"tool_choice names {choice.function.name!r}, which is not in tools")
        callable_tools = [t for t in tools if t.function.name == choice.function.name]
    else:
        callable_tools = list(tools)
    call_rules = [f"call{i}" for i in range(len(callable_tools))]
    lines = [f"call: {' | '.join(call_rules)}"]
    for rule, tool in zip(call_rules, callable_tools, strict=True):
        lines.append(f"{rule}: %json {json.dumps(_call_schema(tool), separators=(',', ':'))}")
    call = f'"{CALL_OPEN}" call "{CALL_CLOSE}"'
    if choice == "auto":
        text = "answer" if answer is not None else "TEXT"
        start = f"start: {text} | {call}"
        if answer is not None:
            lines.append(f"answer: %json {answer}")
        else:
            lines.append(r"TEXT: /[^<](.|\n)*/")  # plain text: anything not opening a call
    else:
        start = f"start: {call}"
    grammar = "\n".join([start, *lines])
    return Structure(Constraint(ConstraintKind.LARK_GRAMMAR, grammar, "tools"), _tools_prompt(tools), calls=True)


def _format_schema(response_format: ResponseFormat | None) -> str | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return JSON_OBJECT_SCHEMA
    if response_format.json_schema is None:
        raise InvalidRequest("response_format: type json_schema needs json_schema.schema")
    return json.dumps(response_format.json_schema.schema_, separators=(",", ":"))


def _call_schema(tool: Tool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": tool.function.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _tools_prompt(tools: list[Tool]) -> str:
    """Compact (a small model's context is short): one line per tool, its description only if it has one."""
    lines = [f'Tools; to call one, answer only {CALL_OPEN}{{"name": ..., "arguments": {{...}}}}{CALL_CLOSE}']
    for t in tools:
        described = {"name": t.function.name, "parameters": t.function.parameters}
        if t.function.description:
            described["description"] = t.function.description
        lines.append(json.dumps(described, separators=(",", ":")))
    return "\n".join(lines)


def with_tools_prompt(messages: tuple[tuple[str, str], ...], prompt: str) -> tuple[tuple[str, str], ...]:
    """The messages with the tools described: added to the first system message, or as one before all."""
    if not prompt:
        return messages
    if messages and messages[0][0] == "system":
        return (("system", f"{messages[0][1]}\n\n{prompt}"), *messages[1:])
    return (("system", prompt), *messages)


def render_calls(calls: list[ToolCall]) -> str:
    """An assistant message's earlier tool calls, as the model writes them."""
    out = []
    for call in calls:
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"tool_calls[{call.id}].function.arguments is not JSON: {exc}") from exc
        out.append(CALL_OPEN + json.dumps({"name": call.function.name, "arguments": arguments}) + CALL_CLOSE)
    return "\n".join(out)


def parse_call(text: str) -> dict[str, Any] | None:
    """The `tool_calls` entry of a complete call in `text` (None: the answer is plain content)."""
    body = text.rstrip()  # the grammar's call opens at the answer's first character; text cannot
    if not (body.startswith(CALL_OPEN) and body.endswith(CALL_CLOSE)):
        return None
    try:
        call = json.loads(body[len(CALL_OPEN) : -len(CALL_CLOSE)])
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
        return None
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
    }


def may_be_call(text: str) -> bool:
    """Whether `text` (the answer so far) may still become a tool call: a stream holds it back until it cannot."""
    return text.startswith(CALL_OPEN) or CALL_OPEN.startswith(text)

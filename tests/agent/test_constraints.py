"""Constrained decoding through the runtime, the real gRPC server and the OpenAI-compatible routes
(the official `openai` client) with the tiny model: a JSON schema, a regular expression and a Lark
grammar hold the output, alone, batched and with unconstrained neighbours; bad ones are refused
with the reason before any token; tools come back as `tool_calls` with valid arguments."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from agent_helpers import PacedHost, load_unpacked, serving
from test_openai_api import Stack

from slmops_agent.errors import InvalidRequest
from slmops_agent.runtime.constraints import Constraint, ConstraintKind
from slmops_agent.runtime.model import LoadedModel
from slmops_agent.runtime.requests import GenerationRequest, Limits
from slmops_protos.agent.v1 import agent_pb2, agent_pb2_grpc

ACTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"action": {"enum": ["on", "off"]}, "room": {"enum": ["kitchen", "hall"]}},
    "required": ["action", "room"],
    "additionalProperties": False,
}
LIGHT_TOOL: dict[str, Any] = {  # small: the tiny model's context is 256 tokens
    "type": "function",
    "function": {
        "name": "light",
        "parameters": {
            "type": "object",
            "properties": {"on": {"type": "boolean"}},
            "required": ["on"],
            "additionalProperties": False,
        },
    },
}


def valid_action(text: str) -> bool:
    value = json.loads(text)
    return (
        set(value) == {"action", "room"} and value["action"] in ("on", "off") and value["room"] in ("kitchen", "hall")
    )


def valid_light_arguments(arguments: str) -> bool:
    value = json.loads(arguments)
    return set(value) == {"on"} and isinstance(value["on"], bool)


def schema(value: dict[str, Any] = ACTION_SCHEMA) -> Constraint:
    return Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(value))


# -- the runtime ------------------------------------------------------------------------------------
@pytest.fixture
def host(model: LoadedModel) -> Iterator[PacedHost]:
    h = PacedHost(queue_bound=16, limits=Limits(default_max_new_tokens=64, max_new_tokens_limit=200))
    h.swap(model)
    yield h
    h.close()


def test_each_kind_of_constraint_holds_the_tiny_models_output(host: PacedHost) -> None:
    plain = host.generate(GenerationRequest(prompt="Hello world.", temperature=0.0))
    assert not plain.text.startswith("{")  # the random model does not write JSON by itself
    held = host.generate(GenerationRequest(prompt="Hello world.", temperature=0.0, constraint=schema()))
    assert valid_action(held.text) and held.finish_reason.value == "STOP", held.text
    regex = Constraint(ConstraintKind.REGEX, r"(yes|no)\. [0-9]{3}")
    answer = host.generate(GenerationRequest(prompt="Hello world.", temperature=1.0, seed=3, constraint=regex)).text
    assert answer[:4] in ("yes.", "no. ") and answer[-3:].isdigit() and len(answer) in (8, 7), answer
    lark = Constraint(
        ConstraintKind.LARK_GRAMMAR, 'start: "light " ROOM " " STATE\nROOM: "kitchen" | "hall"\nSTATE: "on" | "off"'
    )
    line = host.generate(GenerationRequest(prompt="Hello world.", temperature=0.0, constraint=lark)).text
    assert (
        line.split(" ")[0] == "light"
        and line.split(" ")[1] in ("kitchen", "hall")
        and line.split(" ")[2] in ("on", "off")
    )


@pytest.mark.parametrize(
    ("kind", "text", "reason"),
    [
        (ConstraintKind.JSON_SCHEMA, "{not json", "is not JSON"),
        (ConstraintKind.JSON_SCHEMA, "[1, 2]", "must be a JSON object or boolean"),
        (ConstraintKind.JSON_SCHEMA, '{"type": "frob"}', "Invalid type: frob"),
        (ConstraintKind.REGEX, "(unclosed", "unclosed group"),
        (ConstraintKind.LARK_GRAMMAR, "start: foo", 'unknown name: "foo"'),
        (ConstraintKind.REGEX, "  ", "is empty"),
        (ConstraintKind.REGEX, "a" * 70_000, "70000 characters; the limit is 65536"),
        (ConstraintKind.LARK_GRAMMAR, 'start: "\x00"', "NUL character"),
    ],
)
def test_a_bad_constraint_is_refused_with_its_reason_before_any_token(
    host: PacedHost, kind: ConstraintKind, text: str, reason: str
) -> None:
    pieces: list[str] = []
    with pytest.raises(InvalidRequest, match=reason) as caught:
        host.generate(
            GenerationRequest(prompt="Hello world.", constraint=Constraint(kind, text)), on_text=pieces.append
        )
    assert pieces == [] and "\n" not in str(caught.value)
    assert host.generate(GenerationRequest(prompt="Hello world.", max_new_tokens=4)).completion_tokens == 4


# -- gRPC -------------------------------------------------------------------------------------------
@pytest.fixture
def stub(host: PacedHost) -> Iterator[agent_pb2_grpc.InferenceStub]:
    with serving(host, addr_file=False) as served, grpc.insecure_channel(served.addresses[0]) as channel:
        yield agent_pb2_grpc.InferenceStub(channel)


def test_a_regex_over_grpc_and_a_bad_one_refused_with_the_reason(stub: agent_pb2_grpc.InferenceStub) -> None:
    req = agent_pb2.GenerateRequest(prompt="Hello world.", regex=r"[0-9]{4}-[0-9]{2}", temperature=0.0)
    text = "".join(c.text for c in stub.Generate(req, timeout=30))
    assert len(text) == 7 and text[4] == "-" and text.replace("-", "").isdigit(), text
    assert stub.GenerateUnary(req, timeout=30).text == text
    lark = agent_pb2.GenerateRequest(prompt="Hi", lark_grammar='start: "a" | "b"', max_new_tokens=8)
    assert stub.GenerateUnary(lark, timeout=30).text in ("a", "b")
    bad_regex = agent_pb2.GenerateRequest(prompt="Hi", regex="(unclosed")
    bad_schema = agent_pb2.GenerateRequest(prompt="Hi", json_schema='{"type": 3}')
    for bad, reason in ((bad_regex, "unclosed group"), (bad_schema, "json_schema")):
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(bad, timeout=30))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in str(caught.value.details())


def test_constrained_and_plain_requests_share_one_batch(host: PacedHost, stub: agent_pb2_grpc.InferenceStub) -> None:
    from test_batching import Streams

    reqs = [
        agent_pb2.GenerateRequest(prompt="Hello world.", json_schema=json.dumps(ACTION_SCHEMA), max_new_tokens=64),
        agent_pb2.GenerateRequest(prompt="Hello world.", max_new_tokens=16, temperature=0.0),
        agent_pb2.GenerateRequest(prompt="one two", regex=r"(yes|no)!", max_new_tokens=16),
        agent_pb2.GenerateRequest(prompt="one two", regex="(unclosed", max_new_tokens=16),
    ]
    solo = [stub.GenerateUnary(r, timeout=30).text for r in reqs[:3]]
    batches_before = host.metrics.snapshot().batches_total
    streams = Streams(host, stub)
    for r in reqs:
        streams.start(r)
    streams.release()
    streams.join()
    assert host.metrics.snapshot().batches_total == batches_before + 1
    assert streams.errors[:3] == [None] * 3
    error = streams.errors[3]
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [streams.text(i) for i in range(3)] == solo  # each the same as alone, the plain one unconstrained
    assert valid_action(solo[0]) and solo[2] in ("yes!", "no!")


# -- OpenAI-compatible, the official client ---------------------------------------------------------
@pytest.fixture(scope="module")
def long_model(tiny_long_package: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_unpacked(tiny_long_package, tmp_path_factory.mktemp("tiny-1024-unpacked"))


@pytest.fixture
def stack(long_model: LoadedModel) -> Iterator[Stack]:
    s = Stack(long_model)
    try:
        yield s
    finally:
        s.close()


def test_response_format_json_schema_and_json_object(stack: Stack) -> None:
    response_format: Any = {
        "type": "json_schema",
        "json_schema": {"name": "action", "schema": ACTION_SCHEMA, "strict": True},
    }
    messages: Any = [{"role": "user", "content": "Turn on the kitchen light."}]
    plain = stack.client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=64, response_format=response_format
    )
    content = plain.choices[0].message.content
    assert content is not None and valid_action(content) and plain.choices[0].finish_reason == "stop"
    stream = stack.client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=64, response_format=response_format, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == content
    obj = stack.client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=120, response_format={"type": "json_object"}, temperature=0.0
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)
    else:  # cut by max_tokens: still the start of an object
        assert (obj.choices[0].message.content or "").lstrip().startswith("{")
    done = httpx.post(
        f"{stack.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 64, "response_format": response_format}
    )
    assert done.status_code == 200 and valid_action(done.json()["choices"][0]["text"])


def test_a_bad_schema_is_a_400_naming_the_problem(stack: Stack) -> None:
    messages: Any = [{"role": "user", "content": "hi"}]
    for stream in (False, True):
        bad: Any = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}
        with pytest.raises(openai.BadRequestError) as caught:
            stack.client.chat.completions.create(
                model="tiny-llama", messages=messages, response_format=bad, stream=stream
            )
        assert "response_format is invalid: Invalid type: frob" in caught.value.message
    tool: Any = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}}},
    }
    with pytest.raises(openai.BadRequestError, match="tools is invalid"):
        stack.client.chat.completions.create(
            model="tiny-llama", messages=messages, tools=[tool], tool_choice="required"
        )
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        stack.client.chat.completions.create(
            model="tiny-llama",
            messages=messages,
            tools=[LIGHT_TOOL],
            tool_choice={"type": "function", "function": {"name": "g"}},
        )
    with pytest.raises(openai.BadRequestError, match="tools is empty"):
        stack.client.chat.completions.create(model="tiny-llama", messages=messages, tool_choice="required")
    hostile = [
        ({"tools": [{"type": "function", "function": {"name": "rm -rf"}}]}, "tools.0.function.name"),
        ({"tools": [LIGHT_TOOL, LIGHT_TOOL]}, "function names must be unique"),
        ({"tools": [LIGHT_TOOL], "tool_choice": "always"}, "tool_choice"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "needs json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"enum": ["x" * 70_000]}}}}, "65536"),
    ]
    for extra, reason in hostile:
        got = httpx.post(f"{stack.url}/v1/chat/completions", json={"messages": messages, **extra}, timeout=30)
        assert got.status_code == 400 and reason in got.json()["error"]["message"], (extra, got.text)
    assert stack.host.metrics.snapshot().completion_tokens_total == 0


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "light"}}])
def test_tools_come_back_as_tool_calls_with_valid_arguments(stack: Stack, choice: Any) -> None:
    messages: Any = [{"role": "user", "content": "Lights on."}]
    tools: Any = [LIGHT_TOOL, {"type": "function", "function": {"name": "noop"}}]
    if choice == "required":
        tools = [LIGHT_TOOL]
    done = stack.client.chat.completions.create(
        model="tiny-llama", messages=messages, tools=tools, tool_choice=choice, max_tokens=100
    )
    message = done.choices[0].message
    assert done.choices[0].finish_reason == "tool_calls", (message.content, done.usage)
    assert message.content is None and message.tool_calls
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "light" and valid_light_arguments(call.function.arguments)
    chunks = list(stack.client.chat.completions.create(
        model="tiny-llama", messages=messages, tools=tools, tool_choice=choice, max_tokens=100, stream=True
    ))  # fmt: skip
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert len(streamed) == 1 and streamed[0].function and streamed[0].function.arguments == call.function.arguments
    assert not any(d.content for d in deltas) and chunks[-1].choices[0].finish_reason == "tool_calls"
    # the call goes back into the conversation with its result
    follow = [
        *messages,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "done"},
    ]
    again = stack.client.chat.completions.create(model="tiny-llama", messages=follow, max_tokens=8)
    assert again.choices[0].message.content


def test_auto_lets_the_model_answer_text_and_streams_it(stack: Stack) -> None:
    messages: Any = [{"role": "user", "content": "Hello world."}]
    done = stack.client.chat.completions.create(
        model="tiny-llama", messages=messages, tools=[LIGHT_TOOL], max_tokens=12, temperature=0.0
    )
    text = done.choices[0].message.content
    if done.choices[0].message.tool_calls:  # the random model chose the call: it must be valid
        assert valid_light_arguments(done.choices[0].message.tool_calls[0].function.arguments)
    else:
        assert text and not text.startswith("<")
        stream = stack.client.chat.completions.create(
            model="tiny-llama", messages=messages, tools=[LIGHT_TOOL], max_tokens=12, temperature=0.0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def test_a_constrained_stream_closed_early_frees_its_slot(stack: Stack) -> None:
    stack.host.pace_s = 0.02
    response_format: Any = {
        "type": "json_schema",
        "json_schema": {
            "name": "long",
            "schema": {"type": "array", "items": {"enum": ["kitchen", "hall"]}, "minItems": 150},
        },
    }
    stream = stack.client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=200,
        stream=True,
        response_format=response_format,
    )
    got = [next(stream) for _ in range(4)]
    assert any(c.choices[0].delta.content for c in got)
    stream.close()
    deadline = time.monotonic() + 5
    while stack.host.metrics.snapshot().requests_by_code.get("CANCELLED") != 1:
        assert time.monotonic() < deadline, stack.host.metrics.snapshot().requests_by_code
        time.sleep(0.01)
    assert stack.host.queue.depth == 0
    assert stack.host.metrics.snapshot().completion_tokens_total < 40
    stack.host.pace_s = 0.0
    again = stack.client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=8
    )
    assert again.choices[0].finish_reason in ("length", "stop")


def test_a_constraint_holds_with_an_adapter(adapter_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """An adapter's request runs on a lone generator (the Engine has no adapters); the constraint holds there."""
    from slmops_agent.runtime.model import ModelInfo

    folder = tmp_path / "slot"
    folder.mkdir()
    for pkg in adapter_pair:  # the base's files, then the adapter's beside them (as a slot holds them)
        for f in json.loads((pkg / "manifest.json").read_text())["files"]:
            (folder / f["path"]).write_bytes((pkg / "blobs" / f["sha256"]).read_bytes())
    info = ModelInfo(
        name="tiny-base", version="0.1.0", adapters=("lora",), adapter_files=(("lora", "lora.onnx_adapter"),)
    )
    model = LoadedModel(folder, info, threads=1)
    limits = Limits(default_max_new_tokens=32)
    regex = Constraint(ConstraintKind.REGEX, r"(on|off) (kitchen|hall)")
    req = GenerationRequest(messages=(("user", "Hi"),), adapter="lora", temperature=0.0, constraint=regex)
    assert not model.batchable(req)
    text = model.generate(req, limits=limits).text
    assert text.split(" ")[0] in ("on", "off") and text.split(" ")[1] in ("kitchen", "hall"), text
    with pytest.raises(InvalidRequest, match="unclosed group"):
        model.generate(
            GenerationRequest(prompt="Hi", adapter="lora", constraint=Constraint(ConstraintKind.REGEX, "(")),
            limits=limits,
        )

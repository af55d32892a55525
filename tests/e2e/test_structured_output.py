"""Structured output through the real `slmops agent run` process (side-loaded with `slmops agent
install`) and real clients: the official `openai` client with `response_format` json_schema
(streamed and not) and `tools` (a tool call with valid arguments), `slmops agent ask --regex`
over gRPC, bad schemas refused with the reason, and (with SmolLM2, slow enough to leave mid-answer) a
constrained stream closed early freeing its place."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from slmops_cli.procs import ProcessFailed, Service, run
from slmops_testing.processes import AGENT_ENV

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"action": {"enum": ["on", "off"]}, "room": {"enum": ["kitchen", "hall"]}},
    "required": ["action", "room"],
    "additionalProperties": False,
}
TOOL: Any = {
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


class Running:
    def __init__(self, state: Path, service: Service) -> None:
        self.state = state
        self.service = service
        self.url = "http://" + (state / "metrics.addr").read_text().strip()
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)


@contextmanager
def _serving(package: Path, signing_key: tuple[Path, Path], tmp_path: Path) -> Iterator[Running]:
    state = tmp_path / "state"
    run(["agent", "install", str(package), "--state-dir", str(state), "--trust-key", str(signing_key[1])])
    service = Service(
        "agent",
        ["agent", "run", "--state-dir", str(state), "--grpc-port", "0", "--metrics-port", "0"],
        tmp_path / "agent.log",
        env={**AGENT_ENV, "SLMOPS_AGENT_DEFAULT_MAX_NEW_TOKENS": "64"},
    )
    try:
        service.wait_for((state / "metrics.addr").exists, timeout=60, what="its HTTP address")
        service.wait_for((state / "grpc.addr").exists, timeout=60, what="its gRPC address")
        r = Running(state, service)
        service.wait_for(lambda: r.client.models.list().data or None, timeout=120, what="its model loaded")
        yield r
        r.client.close()
    finally:
        service.stop()


@pytest.fixture
def agent(tiny_long_package: Path, signing_key: tuple[Path, Path], tmp_path: Path) -> Iterator[Running]:
    with _serving(tiny_long_package, signing_key, tmp_path) as r:
        yield r


def valid(text: str) -> bool:
    value = json.loads(text)
    return (
        set(value) == {"action", "room"} and value["action"] in ("on", "off") and value["room"] in ("kitchen", "hall")
    )


def test_structured_output_through_the_agent_process(agent: Running) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "action", "schema": SCHEMA, "strict": True}}
    messages: Any = [{"role": "user", "content": "Turn on the kitchen light."}]
    done = agent.client.chat.completions.create(model="tiny-llama", messages=messages, response_format=fmt)
    assert valid(done.choices[0].message.content or ""), done.choices[0].message.content
    stream = agent.client.chat.completions.create(model="", messages=messages, response_format=fmt, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == done.choices[0].message.content

    called = agent.client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "Lights on."}],
        tools=[TOOL],
        tool_choice="required",
        max_tokens=100,
    )
    calls = called.choices[0].message.tool_calls
    assert called.choices[0].finish_reason == "tool_calls" and calls and calls[0].function.name == "light"
    arguments = json.loads(calls[0].function.arguments)
    assert set(arguments) == {"on"} and isinstance(arguments["on"], bool)

    bad: Any = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "required": 3}}}
    with pytest.raises(openai.BadRequestError) as caught:
        agent.client.chat.completions.create(model="tiny-llama", messages=messages, response_format=bad, stream=True)
    assert "response_format is invalid: Expected array for 'required', got 3" in caught.value.message


def test_regex_over_grpc_with_the_cli_and_a_bad_one_refused(agent: Running, tmp_path: Path) -> None:
    state = ["--state-dir", str(agent.state)]
    got = json.loads(run(["agent", "ask", "What day?", *state, "--json", "--regex", r"20[0-9]{2}-[01][0-9]"]))
    text = got["text"]
    assert len(text) == 7 and text.startswith("20") and text[4] == "-" and got["finish_reason"] == "STOP", got
    grammar = tmp_path / "yes.lark"
    grammar.write_text('start: "yes" | "no"\n')
    assert json.loads(run(["agent", "ask", "Sure?", *state, "--json", "--grammar", f"@{grammar}"]))["text"] in (
        "yes",
        "no",
    )
    with pytest.raises(ProcessFailed, match="unclosed group"):
        run(["agent", "ask", "Hi", *state, "--regex", "(unclosed"])


@pytest.mark.smollm2
def test_a_constrained_stream_closed_early_frees_its_place(
    smollm2_package: Path, signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    """SmolLM2 decodes slowly enough (tens of tokens/s on a small CPU) for a client to leave mid-answer."""
    import httpx

    with _serving(smollm2_package, signing_key, tmp_path) as agent:
        fmt: Any = {
            "type": "json_schema",
            "json_schema": {"name": "list", "schema": {"type": "array", "items": {"type": "string"}, "minItems": 400}},
        }
        stream = agent.client.chat.completions.create(
            model="", messages=[{"role": "user", "content": "List fruits."}], response_format=fmt, stream=True,
            max_tokens=1000,
        )  # fmt: skip
        assert any(next(stream).choices[0].delta.content or "" for _ in range(3))
        stream.close()
        deadline = time.monotonic() + 20
        freed = ('slmops_agent_requests_total{code="CANCELLED"} 1.0', "slmops_agent_queue_depth 0.0")
        while not all(line in (metrics := httpx.get(f"{agent.url}/metrics").text) for line in freed):
            assert time.monotonic() < deadline, metrics  # cancelled, and its place in the queue free again
            time.sleep(0.1)
        again = agent.client.chat.completions.create(
            model="", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, timeout=30
        )
        assert again.choices[0].message.content is not None

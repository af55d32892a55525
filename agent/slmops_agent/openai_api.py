"""OpenAI-compatible routes on the agent's loopback HTTP server: GET /v1/models, POST
/v1/chat/completions and POST /v1/completions (`"stream": true` gives server-sent events).

The body is translated into a GenerationRequest at the edge and runs through the same ModelHost as
gRPC (validation, the bounded queue, cancellation when the client goes away). `model` may be empty,
the active model's name, version or package id, with `@version` to pin a version and `:adapter` to
pick a LoRA adapter ("tiny-llama@1.0.0:legal"). Differences from OpenAI: no `temperature` means
the package's generation default (greedy unless its genai_config.json says otherwise), not 1.0;
`n` must be 1; `top_k` and `repetition_penalty` are accepted as extensions;
`presence_penalty` and `frequency_penalty` other than 0 are refused. `response_format`, `tools`
and `tool_choice` hold the answer to a schema (`openai_tools`); with tools, a stream holds the text
back while it may still become a tool call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from slmops_agent.errors import InvalidRequest, NotFound, QueueFull, status_name
from slmops_agent.openai_tools import (
    ResponseFormat,
    Structure,
    Tool,
    ToolCall,
    ToolChoice,
    may_be_call,
    parse_call,
    plan,
    render_calls,
    with_tools_prompt,
)
from slmops_agent.relay import Relay
from slmops_agent.runtime.host import ModelHost
from slmops_agent.runtime.queue import CLIENT_HEADER, client_key
from slmops_agent.runtime.requests import FinishReason, GenerationRequest, GenerationResult

HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
ERROR_TYPE = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error", 503: "unavailable"}
_FINISH = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.CANCELLED: "stop"}


# -- request bodies ------------------------------------------------------------------------------
class _Params(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, logit_bias=None...)

    model: str = ""
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: ResponseFormat | None = None


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str = ""


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[_Part] | None = None
    tool_calls: list[ToolCall] | None = None


class ChatBody(_Params):
    messages: list[_Message]
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None


class CompletionBody(_Params):
    prompt: str | list[str]


def _content(i: int, m: _Message) -> str:
    calls = render_calls(m.tool_calls) if m.tool_calls else ""
    if m.content is None:
        return calls
    if isinstance(m.content, str):
        return "\n".join(filter(None, (m.content, calls)))
    for part in m.content:
        if part.type != "text":
            raise InvalidRequest(f"messages[{i}].content: only text parts are supported; got {part.type!r}")
    return "\n".join(filter(None, ("".join(p.text for p in m.content), calls)))


def _to_request(body: _Params, host: ModelHost) -> tuple[GenerationRequest, Structure]:
    if body.n != 1:
        raise InvalidRequest(f"n must be 1; got {body.n}")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise InvalidRequest(f"{name} is not supported (use repetition_penalty)")
    adapter, version = _resolve_model(body.model, host)
    if body.top_k is not None and body.top_k < 0:
        raise InvalidRequest(f"top_k must be in [0, 100000]; got {body.top_k}")
    if body.seed is not None and body.seed < 0:
        raise InvalidRequest(f"seed must be >= 0; got {body.seed}")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    common: dict[str, Any] = {
        "max_new_tokens": body.max_completion_tokens or body.max_tokens or 0,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "seed": body.seed,
        "stop": stop,
        "adapter": adapter,
        "model_version": version,
        "repetition_penalty": body.repetition_penalty,
    }
    if isinstance(body, ChatBody):
        structure = plan(body.response_format, body.tools, body.tool_choice)
        messages = tuple((m.role, _content(i, m)) for i, m in enumerate(body.messages))
        if not messages:
            raise InvalidRequest("messages is empty")
        messages = with_tools_prompt(messages, structure.tools_prompt)
        return GenerationRequest(messages=messages, constraint=structure.constraint, **common), structure
    assert isinstance(body, CompletionBody)
    structure = plan(body.response_format, None, None)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise InvalidRequest(f"give one prompt; got {len(prompts)}")
    return GenerationRequest(prompt=prompts[0], constraint=structure.constraint, **common), structure


def _resolve_model(model: str, host: ModelHost) -> tuple[str, str]:
    """(adapter, version pin) from the `model` field; NOT_FOUND for a model this agent does not serve."""
    if not model:
        return "", ""
    base, _, adapter = model.partition(":")
    name, _, version = base.partition("@")
    active = host.model
    if active is not None and name and name not in (active.info.name, active.info.version, active.info.package_id):
        raise NotFound(f"model {name!r} is not served here (the active model is {active.info.name!r})")
    if active is not None and name in (active.info.version, active.info.package_id) and not version:
        version = name
    return adapter, version


# -- running one request ---------------------------------------------------------------------------
class _Run:
    """One generation through the host: `start` validates and queues (raising at once), `events`
    yields ("text", str) pieces and ends with ("done", GenerationResult); leaving it cancels."""

    def __init__(self, host: ModelHost, req: GenerationRequest, client: str) -> None:
        self.relay = Relay(asyncio.get_running_loop(), host.stream_group_s, host.first_yield_s)
        self.cancel = threading.Event()
        self.future = host.submit(req, cancel=self.cancel, on_text=lambda t: self._put("text", t), client=client)
        self.future.add_done_callback(self._done)

    def _put(self, kind: str, value: Any) -> None:
        if not self.relay.put(kind, value):  # the loop is closed
            self.cancel.set()

    def _done(self, future: concurrent.futures.Future[GenerationResult]) -> None:
        if future.cancelled():
            self._put("error", InvalidRequest("cancelled"))
        elif (exc := future.exception()) is not None:
            self._put("error", exc)
        else:
            self._put("done", future.result())

    async def next(self) -> tuple[str, Any]:
        kind, value = await self.relay.next()
        if kind == "error":
            raise value
        return kind, value


def error_response(exc: BaseException) -> JSONResponse:
    code = status_name(exc)
    status = HTTP_STATUS.get(code, 500)
    message = str(exc) if code != "INTERNAL" else f"internal error: {type(exc).__name__}"
    headers = {}
    if isinstance(exc, QueueFull):
        headers = {"retry-after-ms": str(exc.retry_after_ms), "retry-after": str(math.ceil(exc.retry_after_ms / 1000))}
    body = {"error": {"message": message, "type": ERROR_TYPE.get(status, "server_error"), "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def openai_routes(host: ModelHost) -> list[Route]:
    async def parse(request: Request, kind: type[_Params]) -> _Params:
        try:
            raw = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"the body is not JSON: {exc}") from exc
        try:
            return kind.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise InvalidRequest(f"{where}: {first['msg']}") from exc

    async def generate(request: Request, kind: Literal["chat", "text"]) -> Response:
        try:
            body = await parse(request, ChatBody if kind == "chat" else CompletionBody)
            req, structure = _to_request(body, host)
            model = host.model
            model_name = body.model or (model.info.name if model is not None else "")
            peer = f"ipv4:{request.client.host}:{request.client.port}" if request.client else "unix:"
            run = _Run(host, req, client_key(request.headers.get(CLIENT_HEADER), peer))
        except Exception as exc:
            return error_response(exc)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            try:  # the first event decides the status: an error before any text is a plain error response
                first = await run.next()
            except Exception as exc:
                run.cancel.set()
                return error_response(exc)
            usage_too = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                _stream(run, first, kind, rid, created, model_name, usage_too, structure.calls),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )
        text: list[str] = []
        watcher = asyncio.ensure_future(_watch_disconnect(request, run.cancel))
        try:
            while True:
                event, value = await run.next()
                if event == "text":
                    text.append(value)
                    continue
                result: GenerationResult = value
                break
        except Exception as exc:
            return error_response(exc)
        finally:
            run.cancel.set()
            watcher.cancel()
        content = "".join(text)
        choice: dict[str, Any] = {"index": 0, "finish_reason": _FINISH[result.finish_reason], "logprobs": None}
        call = parse_call(content) if structure.calls else None
        if call is not None:
            choice["message"] = {"role": "assistant", "content": None, "tool_calls": [call]}
            choice["finish_reason"] = "tool_calls"
        elif kind == "chat":
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": created,
                "model": model_name,
                "system_fingerprint": result.package_id[:16],
                "choices": [choice],
                "usage": _usage(result),
            }
        )

    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")

    async def completions(request: Request) -> Response:
        return await generate(request, "text")

    async def models(request: Request) -> Response:
        model = host.model
        data = []
        if model is not None:
            i = model.info
            data.append({"id": i.name, "object": "model", "created": 0, "owned_by": "slmops", "version": i.version})
            data += [
                {"id": f"{i.name}:{a}", "object": "model", "created": 0, "owned_by": "slmops", "version": i.version}
                for a in i.adapters
            ]
        return JSONResponse({"object": "list", "data": data})

    return [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set `cancel` when the client of a plain (not streamed) request goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


async def _stream(
    run: _Run,
    first: tuple[str, Any],
    kind: Literal["chat", "text"],
    rid: str,
    created: int,
    model: str,
    usage_too: bool,
    calls: bool = False,
) -> AsyncIterator[bytes]:
    """Server-sent events in OpenAI's chunk format, `data: [DONE]` last. Leaving early (the client
    went away) cancels the generation. With `calls`, text is held back while it may still become a
    tool call; a call is sent whole, in one `tool_calls` delta."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return _sse({"id": rid, "object": obj, "created": created, "model": model, "choices": choices, **extra})

    def piece(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

    held: str | None = "" if calls else None  # None: nothing held, text streams as it comes
    try:
        if kind == "chat":
            yield chunk([piece(None, None, role=True)])
        event, value = first
        while True:
            if event == "text" and held is not None:
                held += value
                if not may_be_call(held):
                    yield chunk([piece(held, None)])
                    held = None
            elif event == "text":
                yield chunk([piece(value, None)])
            else:
                result: GenerationResult = value
                finish = _FINISH[result.finish_reason]
                call = parse_call(held) if held else None
                if call is not None:
                    delta = {"tool_calls": [{"index": 0, **call}]}
                    yield chunk([{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}])
                    finish = "tool_calls"
                elif held:
                    yield chunk([piece(held, None)])
                yield chunk([piece(None, finish)])
                if usage_too:
                    yield chunk([], usage=_usage(result))
                yield _sse("[DONE]")
                return
            try:
                event, value = await run.next()
            except Exception as exc:  # after the headers: report in the stream, as OpenAI does
                code = status_name(exc)
                yield _sse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": code}})
                return
    finally:
        run.cancel.set()

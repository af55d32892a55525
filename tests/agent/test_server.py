"""The gRPC API over a real Unix socket and TCP, served from the real tiny model."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agent_helpers import PacedHost, ServerThread
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from slmops_agent.runtime.host import ModelHost
from slmops_agent.runtime.model import LoadedModel
from slmops_agent.runtime.requests import Limits
from slmops_agent.server import SERVICE_NAME, AgentServer
from slmops_protos.agent.v1 import agent_pb2, agent_pb2_grpc


@pytest.fixture
def host() -> Iterator[PacedHost]:
    h = PacedHost(queue_bound=2, limits=Limits(default_max_new_tokens=8, max_new_tokens_limit=100))
    yield h
    h.close()


@pytest.fixture
def served(host: ModelHost, short_dir: Path) -> Iterator[ServerThread]:
    s = ServerThread(host, short_dir / "agent.sock", short_dir / "grpc.addr")
    try:
        yield s
    finally:
        s.stop()


def stub(target: str) -> tuple[grpc.Channel, agent_pb2_grpc.InferenceStub]:
    channel = grpc.insecure_channel(target)
    return channel, agent_pb2_grpc.InferenceStub(channel)


def health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


def wait_health(target: str, status: int, service: str = "") -> None:
    deadline = time.monotonic() + 10
    while health(target, service) != status:
        assert time.monotonic() < deadline, "health did not change"
        time.sleep(0.02)


def chat(text: str, **kw: object) -> agent_pb2.GenerateRequest:
    req = agent_pb2.GenerateRequest(**kw)  # type: ignore[arg-type]
    req.messages.add(role="user", content=text)
    return req


def test_listens_on_the_socket_and_tcp(served: ServerThread, short_dir: Path) -> None:
    unix, tcp = served.addresses
    assert unix == f"unix:{short_dir / 'agent.sock'}" and (short_dir / "agent.sock").exists()
    assert tcp.startswith("127.0.0.1:") and not tcp.endswith(":0")
    assert (short_dir / "grpc.addr").read_text().strip() == tcp


def test_unavailable_and_not_serving_before_a_model(served: ServerThread, host: ModelHost, model: LoadedModel) -> None:
    unix, tcp = served.addresses
    assert health(unix) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert health(tcp, SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
    channel, s = stub(unix)
    with channel:
        with pytest.raises(grpc.RpcError) as err:
            s.GenerateUnary(chat("hi"), timeout=10)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE and "no model" in (err.value.details() or "")
        with pytest.raises(grpc.RpcError) as err2:
            list(s.Generate(chat("hi"), timeout=10))
        assert err2.value.code() is grpc.StatusCode.UNAVAILABLE
    host.swap(model)
    wait_health(unix, health_pb2.HealthCheckResponse.SERVING)
    wait_health(tcp, health_pb2.HealthCheckResponse.SERVING, SERVICE_NAME)


@pytest.mark.parametrize("transport", [0, 1], ids=["unix", "tcp"])
def test_streaming_and_unary_generation(
    served: ServerThread, host: PacedHost, model: LoadedModel, transport: int
) -> None:
    """At a device's speed (a few ms a token) each piece is a message of its own."""
    host.swap(model)
    host.pace_s = 0.003
    channel, s = stub(served.addresses[transport])
    with channel:
        chunks = list(s.Generate(chat("What is the capital of France?", max_new_tokens=12), timeout=30))
        unary = s.GenerateUnary(chat("What is the capital of France?", max_new_tokens=12), timeout=30)
    *pieces, last = chunks
    assert len(pieces) >= 2 and all(p.text for p in pieces)
    assert all(p.model_version == "1.0.0" and p.package_id == "ab" * 32 for p in chunks)
    assert last.finish_reason == agent_pb2.LENGTH and last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens > 0 and last.timings.time_to_first_token_ms > 0
    assert last.timings.tokens_per_second > 0
    text = "".join(p.text for p in pieces)
    assert unary.text == text  # greedy: the same answer either way
    assert unary.usage.completion_tokens == 12 and unary.finish_reason == agent_pb2.LENGTH


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (agent_pb2.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "both empty"),
        (chat("hi", prompt="raw too"), grpc.StatusCode.INVALID_ARGUMENT, "not both"),
        (chat("hi", top_p=2.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (chat("hi", temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (chat("hi", max_new_tokens=1000), grpc.StatusCode.INVALID_ARGUMENT, "limit is 100"),
        (chat("hi", seed=2**40), grpc.StatusCode.INVALID_ARGUMENT, "seed"),
        (chat("hi", adapter="legal"), grpc.StatusCode.NOT_FOUND, "adapter 'legal'"),
        (chat("hi", model_version="0.0.1"), grpc.StatusCode.NOT_FOUND, "not active"),
    ],
)
def test_errors_are_status_codes(
    served: ServerThread,
    host: ModelHost,
    model: LoadedModel,
    request_: agent_pb2.GenerateRequest,
    code: grpc.StatusCode,
    words: str,
) -> None:
    host.swap(model)
    channel, s = stub(served.addresses[0])
    with channel:
        for call in (lambda: s.GenerateUnary(request_, timeout=10), lambda: list(s.Generate(request_, timeout=10))):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() is code
            assert words in (err.value.details() or "")
    assert host.metrics.errors_total == 0  # the caller's mistakes are not the device's errors


def test_queue_full_cancel_and_deadline(served: ServerThread, host: ModelHost, model: LoadedModel) -> None:
    host.swap(model)
    hold = threading.Event()
    holding = threading.Event()

    def occupy() -> None:  # a request that holds the model
        with host.queue.turn(threading.Event()):
            holding.set()
            hold.wait(30)

    t = threading.Thread(target=occupy)
    t.start()
    assert holding.wait(5)
    channel, s = stub(served.addresses[0])
    try:
        # one waits (bound 2) ...
        waiting = s.Generate(chat("hi", max_new_tokens=3), timeout=30)
        deadline = time.monotonic() + 5
        while host.queue.depth < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert host.queue.depth == 2
        # ... the next is refused
        with pytest.raises(grpc.RpcError) as err:
            s.GenerateUnary(chat("hi"), timeout=10)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "bound is 2" in (err.value.details() or "")
        # cancelling the waiting stream frees its place at once
        waiting.cancel()
        while host.queue.depth > 1 and time.monotonic() < deadline + 5:
            time.sleep(0.01)
        assert host.queue.depth == 1
        # a deadline that passes while waiting: DEADLINE_EXCEEDED, and the place is freed too
        with pytest.raises(grpc.RpcError) as err2:
            s.GenerateUnary(chat("hi"), timeout=0.3)
        assert err2.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        while host.queue.depth > 1 and time.monotonic() < deadline + 10:
            time.sleep(0.01)
        assert host.queue.depth == 1
    finally:
        hold.set()
        t.join(10)
        channel.close()
    assert host.metrics.errors_total == 1  # the RESOURCE_EXHAUSTED one


def test_list_models_and_status(served: ServerThread, host: ModelHost, model: LoadedModel) -> None:
    host.swap(model)
    channel, s = stub(served.addresses[1])
    with channel:
        models = s.ListModels(agent_pb2.ListModelsRequest(), timeout=10).models
        status = s.GetStatus(agent_pb2.GetStatusRequest(), timeout=10)
    assert [(m.name, m.version, m.slot, m.active, m.profile) for m in models] == [
        ("tiny-llama", "1.0.0", "a", True, "cpu-int4")
    ]
    assert status.device_id == "dev-x" and status.update_state == "COMMITTED"
    assert status.active_model.version == "1.0.0" and status.active_slot == "a" and status.queue_depth == 0


def test_reflection_lists_the_services(served: ServerThread) -> None:
    with grpc.insecure_channel(served.addresses[1]) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
        method = db.FindFileContainingSymbol(SERVICE_NAME)
        assert method.package == "slmops.agent.v1"


def test_a_second_server_on_the_same_socket_is_refused(served: ServerThread, host: ModelHost, short_dir: Path) -> None:
    from slmops_agent.errors import AgentError

    other = AgentServer(host, socket_path=short_dir / "agent.sock", tcp_address=None)
    with pytest.raises(AgentError, match="in use"):
        asyncio.run(other.start())


def test_the_relay_joins_pieces_that_piled_up_and_keeps_the_order() -> None:
    """The generation thread wakes the loop once for what piles up; text pieces come joined, other
    events on their own and in order."""
    from slmops_agent.relay import Relay

    async def main() -> list[tuple[str, object]]:
        relay = Relay(asyncio.get_running_loop(), group_s=0.0)

        def produce() -> None:
            for event in [("start", 1), ("text", "a"), ("text", "b"), ("text", "c"), ("done", 2)]:
                assert relay.put(*event)

        thread = threading.Thread(target=produce)
        thread.start()
        thread.join()  # all five before the loop runs again
        got = [await relay.next() for _ in range(3)]
        assert relay.put("text", "d")  # a later piece wakes it again
        got.append(await asyncio.wait_for(relay.next(), 5))
        return got

    assert asyncio.run(main()) == [("start", 1), ("text", "abc"), ("done", 2), ("text", "d")]


def test_the_relay_groups_text_in_time_and_holds_no_piece_past_the_next_event() -> None:
    """The "start" event waits for the first piece; after it, text that comes within `group_s` of
    the last wake waits for the next event instead of waking the loop; the end of the stream (or a
    piece after `group_s`) brings it."""
    from slmops_agent.relay import Relay

    async def main() -> None:
        relay = Relay(asyncio.get_running_loop(), group_s=0.2)

        async def put(kind: str, value: object) -> None:
            await asyncio.to_thread(relay.put, kind, value)  # from another thread, as the token loop does

        await put("start", 1)  # never wakes the loop: it comes with the first piece
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiting := asyncio.ensure_future(relay.next())), 0.3)
        await put("text", "a")  # the first piece always wakes the loop
        assert await asyncio.wait_for(waiting, 5) == ("start", 1)
        assert await asyncio.wait_for(relay.next(), 5) == ("text", "a")
        await put("text", "b")
        await put("text", "c")
        with pytest.raises(TimeoutError):  # within 0.2 s of the last wake: held
            await asyncio.wait_for(asyncio.shield(waiting := asyncio.ensure_future(relay.next())), 0.1)
        await asyncio.sleep(0.15)
        await put("text", "d")  # 0.2 s after the last wake: wakes the loop with everything held
        assert await asyncio.wait_for(waiting, 5) == ("text", "bcd")
        await put("text", "e")
        await put("done", None)  # the end is never held, nor is the text before it
        assert await asyncio.wait_for(relay.next(), 5) == ("text", "e")
        assert await asyncio.wait_for(relay.next(), 5) == ("done", None)

    asyncio.run(main())


def test_the_first_piece_holds_the_generation_until_the_consumer_has_sent_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The time to first token does not wait for the GIL's switch interval: the producer of the first
    piece waits until the consumer comes back for more; later pieces do not wait."""
    from slmops_agent import relay as relay_module

    monkeypatch.setattr(relay_module, "FLUSH_WAIT_S", 5.0)

    async def main() -> None:
        relay = relay_module.Relay(asyncio.get_running_loop())
        returned = threading.Event()

        def produce() -> None:
            relay.put("text", "a")
            returned.set()
            relay.put("text", "b")
            relay.put("done", None)

        thread = threading.Thread(target=produce)
        thread.start()
        assert await relay.next() == ("text", "a")
        await asyncio.sleep(0.1)
        assert not returned.is_set()  # "a" is still being sent: the producer waits
        assert await asyncio.wait_for(relay.next(), 5) == ("text", "b")
        assert returned.is_set() and await asyncio.wait_for(relay.next(), 5) == ("done", None)
        await asyncio.to_thread(thread.join, 5)

    asyncio.run(main())


def test_after_the_first_piece_the_generation_pauses_for_first_yield_s() -> None:
    """Once the consumer has taken the first piece, its producer still pauses `first_yield_s` (the
    threads that carry the piece to the client get a core); later pieces never pause."""
    from slmops_agent.relay import Relay

    async def main() -> None:
        relay = Relay(asyncio.get_running_loop(), group_s=0.0, first_yield_s=0.3)
        took: list[float] = []

        def produce() -> None:
            for piece in "ab":
                t0 = time.monotonic()
                relay.put("text", piece)
                took.append(time.monotonic() - t0)

        thread = threading.Thread(target=produce)
        thread.start()
        assert await relay.next() == ("text", "a")
        assert await asyncio.wait_for(relay.next(), 5) == ("text", "b")
        await asyncio.to_thread(thread.join, 5)
        assert took[0] >= 0.3 and took[1] < 0.3

    asyncio.run(main())


def test_the_host_asks_for_the_pause_only_when_the_model_takes_every_core(
    model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slmops_agent.runtime import host as host_module

    host = ModelHost(queue_bound=1, limits=Limits())
    try:
        assert host.first_yield_s == 0.0  # no model
        host.swap(model)  # one thread
        monkeypatch.setattr(host_module.os, "cpu_count", lambda: 1)
        assert host.first_yield_s == host_module.FIRST_YIELD_S > 0
        monkeypatch.setattr(host_module.os, "cpu_count", lambda: 4)
        assert host.first_yield_s == 0.0
    finally:
        host.close()


@pytest.mark.parametrize(
    ("name", "code", "words"),
    [
        ("", grpc.StatusCode.INVALID_ARGUMENT, "name the adapter"),
        ("bad\x00name", grpc.StatusCode.INVALID_ARGUMENT, "name the adapter"),
        ("lora", grpc.StatusCode.FAILED_PRECONDITION, "does not manage adapters"),
    ],
)
def test_remove_adapter_refuses_a_bad_name_and_a_server_without_updater(
    served: ServerThread, name: str, code: grpc.StatusCode, words: str
) -> None:
    channel, s = stub(served.addresses[0])
    with channel, pytest.raises(grpc.RpcError) as err:
        s.RemoveAdapter(agent_pb2.RemoveAdapterRequest(name=name), timeout=10)
    assert err.value.code() is code and words in (err.value.details() or "")

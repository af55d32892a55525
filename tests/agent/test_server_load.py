"""Concurrency through the real gRPC server and the tiny model: the bounded FIFO queue, its retry
hint, cancellation and deadlines freeing places, and no growth in threads or memory under load.

The tiny model makes ~20k tokens/s, far faster than a client could cancel, so `PacedHost` sleeps
before handing each decoded piece on (a slow device); everything else is the real path."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import grpc
import psutil
import pytest
from agent_helpers import PacedHost, ServerThread, serving, wait_until

from slmops_agent.runtime.model import LoadedModel
from slmops_agent.runtime.requests import FinishReason, Limits
from slmops_agent.server import RETRY_AFTER_KEY
from slmops_protos.agent.v1 import agent_pb2, agent_pb2_grpc

BOUND = 16


@pytest.fixture
def host(model: LoadedModel) -> Iterator[PacedHost]:
    h = PacedHost(queue_bound=BOUND, limits=Limits(default_max_new_tokens=8, max_new_tokens_limit=250))
    h.swap(model)
    yield h
    h.close()


@pytest.fixture
def served(host: PacedHost) -> Iterator[ServerThread]:
    with serving(host) as s:
        yield s


def prompt(max_new_tokens: int) -> agent_pb2.GenerateRequest:
    return agent_pb2.GenerateRequest(prompt="Hello", max_new_tokens=max_new_tokens)


def test_64_streams_against_a_bound_of_16(served: ServerThread, host: PacedHost) -> None:
    host.pace_s = 0.004  # 10 tokens: ~40 ms a request, so the 64 overlap

    async def one(stub: agent_pb2_grpc.InferenceStub) -> tuple[grpc.StatusCode, object]:
        try:
            chunks = [c async for c in stub.Generate(prompt(10), timeout=60)]
        except grpc.aio.AioRpcError as exc:
            return exc.code(), (exc.details(), dict(exc.trailing_metadata() or ()))
        return grpc.StatusCode.OK, chunks

    async def main() -> list[tuple[grpc.StatusCode, object]]:
        async with grpc.aio.insecure_channel(served.addresses[1]) as channel:
            stub = agent_pb2_grpc.InferenceStub(channel)
            return await asyncio.gather(*(one(stub) for _ in range(64)))

    outcomes = asyncio.run(main())
    codes = [c for c, _ in outcomes]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    ok = [v for c, v in outcomes if c is grpc.StatusCode.OK]
    refused = [v for c, v in outcomes if c is grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(ok) >= BOUND and refused
    for chunks in ok:
        assert isinstance(chunks, list)
        last = chunks[-1]
        assert last.finish_reason == agent_pb2.LENGTH and last.usage.completion_tokens == 10
    for details, trailers in refused:  # type: ignore[misc]
        assert f"the bound is {BOUND}" in details
        assert 50 <= int(trailers[RETRY_AFTER_KEY]) <= 60_000
    wait_until(lambda: host.queue.depth == 0)
    snap = host.metrics.snapshot()
    assert snap.requests_by_code == {"OK": len(ok), "RESOURCE_EXHAUSTED": len(refused)}


def test_the_unary_call_gets_the_retry_hint_too(served: ServerThread, host: PacedHost) -> None:
    hold, holding = threading.Event(), threading.Event()

    def occupy() -> None:
        with host.queue.turn(threading.Event()):
            holding.set()
            hold.wait(30)

    blockers = [threading.Thread(target=occupy) for _ in range(BOUND)]
    for t in blockers:
        t.start()
    try:
        wait_until(lambda: host.queue.depth == BOUND)
        with grpc.insecure_channel(served.addresses[0]) as channel:
            call = agent_pb2_grpc.InferenceStub(channel).GenerateUnary.with_call
            with pytest.raises(grpc.RpcError) as err:
                call(prompt(2), timeout=10)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(err.value.trailing_metadata() or ())  # type: ignore[attr-defined]
        assert int(trailers[RETRY_AFTER_KEY]) >= 50
    finally:
        hold.set()
        for t in blockers:
            t.join(10)
    assert host.queue.depth == 0


def test_a_cancelled_stream_stops_within_a_token_and_frees_its_place(served: ServerThread, host: PacedHost) -> None:
    host.pace_s = 0.02
    host.stream_group_s = 0.0  # a message per token, so that the client's count is the tokens it heard of
    with grpc.insecure_channel(served.addresses[0]) as channel:
        stream = agent_pb2_grpc.InferenceStub(channel).Generate(prompt(200), timeout=60)
        received = [next(stream) for _ in range(3)]
        assert all(r.text for r in received)
        stream.cancel()
        future = host.futures[-1]
        result = future.result(timeout=5)
    assert result.finish_reason is FinishReason.CANCELLED
    assert result.completion_tokens <= len(received) + 2  # stopped within a token of hearing of it
    wait_until(lambda: host.queue.depth == 0, 1.0)
    assert host.metrics.snapshot().requests_by_code == {"CANCELLED": 1}
    host.pace_s = 0.0
    with grpc.insecure_channel(served.addresses[0]) as channel:  # the place is free for the next
        assert agent_pb2_grpc.InferenceStub(channel).GenerateUnary(prompt(2), timeout=10).usage.completion_tokens == 2


def test_an_expired_deadline_stops_the_generator(served: ServerThread, host: PacedHost) -> None:
    host.pace_s = 0.02
    with grpc.insecure_channel(served.addresses[1]) as channel:
        stub = agent_pb2_grpc.InferenceStub(channel)
        for call in (
            lambda: list(stub.Generate(prompt(200), timeout=0.3)),
            lambda: stub.GenerateUnary(prompt(200), timeout=0.3),
        ):
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            result = host.futures[-1].result(timeout=5)
            elapsed = time.monotonic() - t0
            assert result.finish_reason is FinishReason.CANCELLED
            assert result.completion_tokens <= elapsed / host.pace_s + 2  # 200 would take 4 s
            wait_until(lambda: host.queue.depth == 0, 1.0)
    assert host.metrics.snapshot().requests_by_code == {"DEADLINE_EXCEEDED": 2}
    assert host.metrics.errors_total == 0  # a deadline is the caller's


def test_1000_short_requests_leave_no_thread_or_memory_growth(served: ServerThread, host: PacedHost) -> None:
    proc = psutil.Process()

    async def run(n: int, concurrency: int) -> None:
        async with grpc.aio.insecure_channel(served.addresses[1]) as channel:
            stub = agent_pb2_grpc.InferenceStub(channel)
            todo = iter(range(n))

            async def worker() -> None:
                for i in todo:
                    req = prompt(2) if i % 2 else agent_pb2.GenerateRequest(prompt="Hi", max_new_tokens=2, stop=["x"])
                    if i % 3:
                        reply = await stub.GenerateUnary(req, timeout=30)
                        assert reply.usage.completion_tokens >= 1
                    else:
                        chunks = [c async for c in stub.Generate(req, timeout=30)]
                        assert chunks[-1].usage.completion_tokens >= 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))

    def pool() -> int:
        return sum(t.name.startswith("slmops-gen") for t in threading.enumerate())

    asyncio.run(run(200, BOUND))  # warm up: workers start, allocators settle
    pool_before, py_before, os_before = pool(), threading.active_count(), proc.num_threads()
    rss_before = proc.memory_info().rss
    asyncio.run(run(1000, BOUND))
    wait_until(lambda: host.queue.depth == 0)
    pool_after, py_after, os_after = pool(), threading.active_count(), proc.num_threads()
    rss_after = proc.memory_info().rss
    assert 1 <= pool_after <= BOUND  # the worker pool never outgrows the queue's bound
    assert py_after - pool_after <= py_before - pool_before  # no other Python thread is left behind
    assert os_after - pool_after <= os_before - pool_before + 2  # grpc's own pollers may come and go
    assert rss_after - rss_before < 40 * 1024**2, f"RSS grew by {(rss_after - rss_before) / 1024**2:.1f} MiB"
    assert host.metrics.snapshot().requests_by_code == {"OK": 1200}


def test_a_slow_stream_comes_in_time_groups_with_the_same_text(served: ServerThread, host: PacedHost) -> None:
    """At 10 ms a token, a 60 ms group sends several tokens per message after the first; the text is
    the same as one message per token, and the first piece still comes on its own."""
    host.pace_s = 0.01
    request = agent_pb2.GenerateRequest(prompt="Hello", max_new_tokens=40, temperature=0.0)
    got: dict[float, list[agent_pb2.GenerateResponse]] = {}
    with grpc.insecure_channel(served.addresses[0]) as channel:
        stub = agent_pb2_grpc.InferenceStub(channel)
        for group_s in (0.0, 0.06):
            host.stream_group_s = group_s
            got[group_s] = list(stub.Generate(request, timeout=30))
    each, grouped = got[0.0], got[0.06]
    tokens = each[-1].usage.completion_tokens
    assert tokens == grouped[-1].usage.completion_tokens > 20
    assert "".join(r.text for r in each) == "".join(r.text for r in grouped)
    assert next(r.text for r in grouped if r.text) == next(r.text for r in each if r.text)  # the first alone
    assert len([r for r in each if r.text]) >= tokens - 2  # about one message per token
    assert len([r for r in grouped if r.text]) <= tokens // 3  # 40 tokens x 10 ms in 60 ms groups

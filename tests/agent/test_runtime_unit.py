"""Small pieces of the runtime without a model: request validation, stop sequences, the queue."""

from __future__ import annotations

import threading
import time

import pytest

from slmops_agent.errors import (
    Cancelled,
    InvalidRequest,
    ModelLoadError,
    NoModelLoaded,
    NotFound,
    PackageRejected,
    QueueFull,
    status_name,
)
from slmops_agent.runtime.queue import RequestQueue
from slmops_agent.runtime.requests import GenerationRequest, Limits, validate_request
from slmops_agent.runtime.stops import StopScanner

LIMITS = Limits(default_max_new_tokens=16, max_new_tokens_limit=64)


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (GenerationRequest(), "both empty"),
        (GenerationRequest(prompt="a", messages=(("user", "b"),)), "not both"),
        (GenerationRequest(messages=(("robot", "b"),)), "role must be one of"),
        (GenerationRequest(messages=(("user", ""),)), "content is empty"),
        (GenerationRequest(prompt="a", max_new_tokens=65), "limit is 64"),
        (GenerationRequest(prompt="a", temperature=-1), "temperature"),
        (GenerationRequest(prompt="a", top_p=0), "top_p"),
        (GenerationRequest(prompt="a", top_p=1.5), "top_p"),
        (GenerationRequest(prompt="a", seed=2**31), "seed"),
        (GenerationRequest(prompt="a", repetition_penalty=0), "repetition_penalty"),
        (GenerationRequest(prompt="a", stop=("",)), "stop sequences"),
        (GenerationRequest(prompt="a", stop=("x" * 257,)), r"stop\[0\] is 257 characters; the limit is 256"),
        (GenerationRequest(prompt="a", stop=("x",) * 17), "at most 16 stop sequences; got 17"),
        (GenerationRequest(prompt="a", top_k=100_001), r"top_k must be in \[0, 100000\]"),
        (GenerationRequest(prompt="a", temperature=float("nan")), "temperature"),
        (GenerationRequest(prompt="a" * 1_000_001), "1000001 characters; the limit is 1000000"),
        (GenerationRequest(messages=(("user", "b"),) * 1025), "1025 messages; the limit is 1024"),
        (GenerationRequest(prompt="a", adapter="x\ny"), "control characters"),
    ],
)
def test_invalid_requests(req: GenerationRequest, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        validate_request(req, LIMITS)


def test_valid_request_passes() -> None:
    validate_request(GenerationRequest(prompt="hi", temperature=0.7, top_p=0.9, top_k=40, seed=1, stop=("x",)), LIMITS)


@pytest.mark.parametrize(
    ("stops", "pieces", "emitted", "text", "stopped"),
    [
        ((), ["ab", "cd"], ["ab", "cd"], "abcd", False),
        (("END",), ["hello E", "N", "D more"], ["hello ", "", ""], "hello ", True),
        (("END",), ["hello E", "x"], ["hello ", "Ex"], "hello Ex", False),
        (("ab", "xyz"), ["1a", "2xy", "z9"], ["1", "a2", ""], "1a2", True),
        (("stop",), ["nostop"], ["no"], "no", True),
    ],
)
def test_stop_scanner(stops: tuple[str, ...], pieces: list[str], emitted: list[str], text: str, stopped: bool) -> None:
    s = StopScanner(stops)
    out = []
    for p in pieces:
        out.append(s.feed(p))
        if s.stopped:
            break
    assert out == emitted
    if not s.stopped:
        out.append(s.flush())
    assert "".join(out) == text == s.text
    assert s.stopped is stopped


def test_queue_is_fifo_and_bounded() -> None:
    q = RequestQueue(bound=3)
    order: list[int] = []
    gate = threading.Event()
    never = threading.Event()

    def worker(i: int) -> None:
        with q.turn(never):
            if i == 0:
                gate.wait(5)
            order.append(i)

    threads = []
    for i in range(3):
        t = threading.Thread(target=worker, args=(i,))
        t.start()
        threads.append(t)
        time.sleep(0.05)  # enter in order
    assert q.depth == 3
    with pytest.raises(QueueFull, match="bound is 3"), q.turn(never):
        pass
    gate.set()
    for t in threads:
        t.join(5)
    assert order == [0, 1, 2] and q.depth == 0


def test_cancel_while_waiting_leaves_the_queue() -> None:
    q = RequestQueue(bound=2)
    hold = threading.Event()
    cancel = threading.Event()
    errors: list[BaseException] = []

    def first() -> None:
        with q.turn(threading.Event()):
            hold.wait(5)

    def second() -> None:
        try:
            with q.turn(cancel):
                pass
        except Cancelled as exc:
            errors.append(exc)

    t1 = threading.Thread(target=first)
    t1.start()
    time.sleep(0.05)
    t2 = threading.Thread(target=second)
    t2.start()
    time.sleep(0.05)
    cancel.set()
    t2.join(5)
    assert errors and q.depth == 1
    hold.set()
    t1.join(5)
    assert q.depth == 0


def test_queue_full_carries_a_retry_hint_from_the_recent_turns() -> None:
    q = RequestQueue(bound=1)
    ticket = q.admit()
    with pytest.raises(QueueFull) as err:
        q.admit()
    assert err.value.retry_after_ms == 1000  # nothing measured yet
    q.release(ticket)  # a turn that did not run is not measured
    with q.turn(threading.Event()):
        time.sleep(0.2)
    with q.turn(threading.Event()), pytest.raises(QueueFull) as err2:
        q.admit()
    assert 190 <= err2.value.retry_after_ms <= 1000
    for _ in range(30):  # fast turns bring the hint down to its floor
        with q.turn(threading.Event()):
            pass
    with q.turn(threading.Event()), pytest.raises(QueueFull) as err3:
        q.admit()
    assert err3.value.retry_after_ms == 50


@pytest.mark.parametrize(
    ("exc", "name"),
    [
        (InvalidRequest("x"), "INVALID_ARGUMENT"),
        (NotFound("x"), "NOT_FOUND"),
        (QueueFull("x"), "RESOURCE_EXHAUSTED"),
        (NoModelLoaded("x"), "UNAVAILABLE"),
        (ModelLoadError("x"), "UNAVAILABLE"),
        (Cancelled("x"), "CANCELLED"),
        (TimeoutError(), "DEADLINE_EXCEEDED"),
        (PackageRejected("x"), "FAILED_PRECONDITION"),
        (ZeroDivisionError(), "INTERNAL"),
    ],
)
def test_one_mapping_from_errors_to_status_codes(exc: BaseException, name: str) -> None:
    import grpc

    from slmops_agent.server import status_for

    assert status_name(exc) == name
    code, message = status_for(exc)
    assert code is grpc.StatusCode[name]
    assert message == (str(exc) if name != "INTERNAL" else "internal error: ZeroDivisionError: ")


def test_a_head_takes_the_followers_that_fit_in_order_and_stops_at_the_first_that_does_not() -> None:
    q = RequestQueue(bound=8)
    tickets = [q.admit(job) for job in ("a", "b", "c", "x", "d")]  # "x" cannot share a batch
    never = threading.Event()
    batch = q.start(tickets[0], never, fits=lambda t: t.job != "x", max_batch=4)
    assert batch is not None and [t.job for t in batch] == ["a", "b", "c"]
    assert q.start(tickets[1], never) is None  # taken by the head: its holder only waits for the end
    assert q.depth == 5
    for t in batch:
        q.release(t)
    alone = q.start(tickets[3], never, fits=lambda t: t.job != "x", max_batch=4)
    assert alone is not None and [t.job for t in alone] == ["x"]
    q.release(tickets[3])
    q.release(tickets[3])  # a second release does nothing
    assert q.depth == 1


def test_after_a_batch_the_next_head_lingers_for_the_clients_coming_back() -> None:
    q = RequestQueue(bound=8)
    never = threading.Event()
    first = [q.admit(i) for i in range(3)]
    batch = q.start(first[0], never, fits=lambda t: True, max_batch=4, linger_s=5.0)
    assert batch is not None and len(batch) == 3
    for t in batch:
        q.release(t)
    head = q.admit(10)
    threading.Timer(0.05, lambda: [q.admit(11), q.admit(12)]).start()
    t0 = time.monotonic()
    again = q.start(head, never, fits=lambda t: True, max_batch=4, linger_s=5.0)
    assert again is not None and [t.job for t in again] == [10, 11, 12]  # as many as the last batch
    assert time.monotonic() - t0 < 2.0
    late = q.admit(13)  # arrives while that batch runs: the next head waits for one more
    for t in again:
        q.release(t)
    threading.Timer(0.05, lambda: [q.admit(j) for j in (14, 15, 16)]).start()
    grown = q.start(late, never, fits=lambda t: True, max_batch=4, linger_s=5.0)
    assert grown is not None and [t.job for t in grown] == [13, 14, 15, 16]
    for t in grown:
        q.release(t)
    time.sleep(0.15)  # idle for a while: a new head does not wait
    lone = q.admit(20)
    t0 = time.monotonic()
    assert [t.job for t in q.start(lone, never, fits=lambda t: True, max_batch=4, linger_s=5.0) or []] == [20]
    assert time.monotonic() - t0 < 0.5


@pytest.mark.parametrize(
    ("threads", "cores", "others_busy", "spin"),
    [
        (2, 2, 0.05, True),  # an idle 2-core device: every thread has its core
        (2, 2, 0.45, True),
        (2, 2, 0.6, False),
        (2, 2, 1.0, False),  # one busy process: a spinning thread would fight it
        (4, 8, 3.5, True),
        (4, 8, 5.0, False),
    ],
)
def test_spinning_pays_only_when_every_thread_has_a_free_core(
    threads: int, cores: int, others_busy: float, spin: bool
) -> None:
    from slmops_agent.runtime.spinning import spinning_pays

    assert spinning_pays(threads, cores, others_busy) is spin


def test_auto_spinning_measures_the_other_processes() -> None:
    """A process that keeps a core busy counts; this process's own work does not; with it running,
    "auto" does not spin on every core. One thread never spins (no pool)."""
    import os
    import subprocess
    import sys

    from slmops_agent.runtime.spinning import others_busy_cores, resolve_spinning

    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert others_busy_cores(0.5) >= 0.6
        assert resolve_spinning("auto", os.cpu_count() or 1) is False
    finally:
        hog.kill()
        hog.wait()
    baseline = others_busy_cores(0.4)
    stop = threading.Event()
    spinner = threading.Thread(target=lambda: [None for _ in iter(stop.is_set, True)])
    spinner.start()  # this process keeping a core busy is not "the others"
    try:
        assert others_busy_cores(0.4) < baseline + 0.6
    finally:
        stop.set()
        spinner.join()
    assert resolve_spinning("auto", 1) is False and resolve_spinning(True, 2) is True

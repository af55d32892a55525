"""The bounded request queue (`runtime.queue`): FIFO order, the bound and its retry hint,
cancellation while waiting, and the batches a head takes."""

from __future__ import annotations

import threading
import time

import pytest

from slmops_agent.errors import Cancelled, QueueFull
from slmops_agent.runtime.queue import RequestQueue


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


def test_clients_take_turns_and_each_is_capped() -> None:
    q = RequestQueue(bound=8, client_bound=3)
    never = threading.Event()
    first = q.admit("a0", "a")
    assert q.start(first, never) == [first]  # a0 runs; the rest wait
    tickets = [q.admit(f"a{i}", "a") for i in (1, 2)]
    with pytest.raises(QueueFull, match="bound per client is 3") as refused:
        q.admit("a3", "a")
    assert refused.value.retry_after_ms >= 50
    tickets += [q.admit("b0", "b"), q.admit("b1", "b")]  # b is not held back by a's cap
    order: list[str] = []
    q.release(first)
    for _ in range(4):
        head = next(t for t in tickets if q._may_run(t))
        assert q.start(head, never) == [head]
        order.append(head.job)
        q.release(head)
    assert order == ["b0", "a1", "b1", "a2"] and q.depth == 0  # b never ran, so it goes first


def test_a_turn_steps_aside_between_tokens_while_another_client_waits() -> None:
    q = RequestQueue(bound=4)
    never = threading.Event()
    long = q.admit("long", "a")
    assert q.start(long, never) == [long]
    q.pause([long], never.is_set)  # nobody else waits: returns at once, still running
    assert long.state == "running" and q.depth == 1
    short = q.admit("short", "b")
    ran: list[str] = []

    def other() -> None:
        assert q.start(short, never) == [short]
        ran.append("short")
        q.release(short)

    t = threading.Thread(target=other)
    t.start()
    q.pause([long], never.is_set)  # b waits with nothing running: a steps aside until b is done
    t.join(5)
    assert ran == ["short"] and long.state == "running" and q.depth == 1
    q.release(long)
    assert q.depth == 0


def test_client_key_uses_the_peer_and_the_declared_key() -> None:
    from slmops_agent.runtime.queue import client_key

    assert client_key(None, "ipv4:127.0.0.1:5555") == client_key(None, "ipv4:127.0.0.1:6666") == "ipv4:127.0.0.1"
    assert client_key("job\n7" + "x" * 100, "ipv6:[::1]:5555") == "ipv6:[::1]/job7" + "x" * 60
    assert client_key("", "unix:/run/agent.sock") == "unix"

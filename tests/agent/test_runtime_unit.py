"""Small pieces of the runtime without a model: request validation, stop sequences, the queue."""

from __future__ import annotations

import threading
import time

import pytest

from slmops_agent.errors import Cancelled, InvalidRequest, QueueFull
from slmops_agent.runtime import GenerationRequest, Limits, RequestQueue, _StopScanner, validate_request

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
    s = _StopScanner(stops)
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

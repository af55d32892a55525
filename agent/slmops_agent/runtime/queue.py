"""The bounded request queue: one turn at a time (a request alone or a batch its head takes from the
front), QueueFull with a retry hint past the bound."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from slmops_agent.errors import Cancelled, QueueFull


class Ticket:
    """A place in the queue: waiting, then running (alone, at the head of a batch, or in another's
    batch), then done. `job` is what the holder asked for (the host's; the queue only carries it)."""

    __slots__ = ("admitted", "finished", "job", "outcome", "started", "state")

    def __init__(self, job: Any = None) -> None:
        self.admitted = time.monotonic()
        self.job = job
        self.state = "waiting"
        self.started = 0.0
        self.finished = threading.Event()
        self.outcome: Any = None


class RequestQueue:
    """A bounded FIFO of requests. One turn runs at a time: a request alone, or a batch that its head
    takes from the front of the queue (only requests the head's `fits` accepts, stopping at the first
    it refuses, so nobody is overtaken). Past the bound: QueueFull, with a retry hint from the recent
    time per request."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._cond = threading.Condition()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._running = 0
        self._turn_ms = 0.0  # moving average of the time a turn takes
        self._last_batch = 1  # size of the latest batch
        self._arrivals = 0  # requests admitted while the latest batch ran
        self._last_end = 0.0  # when the queue last fell idle (monotonic)

    @property
    def depth(self) -> int:
        """Requests waiting or running."""
        return len(self._waiting) + self._running

    def retry_after_ms(self) -> int:
        """When a place is likely free: after the running turn, so the recent mean turn (1 s before
        any), within [50 ms, 60 s]."""
        return int(min(60_000.0, max(50.0, self._turn_ms or 1000.0)))

    def admit(self, job: Any = None) -> Ticket:
        """Take a place at the end of the queue or raise QueueFull at once."""
        with self._cond:
            depth = self.depth
            if depth >= self.bound:
                raise QueueFull(
                    f"{depth} requests are queued (the bound is {self.bound}); retry later",
                    retry_after_ms=self.retry_after_ms(),
                )
            ticket = Ticket(job)
            self._waiting.append(ticket)
            if self._running:
                self._arrivals += 1
            self._cond.notify_all()  # a head lingering for its batch
            return ticket

    def start(
        self,
        ticket: Ticket,
        cancel: threading.Event,
        *,
        fits: Callable[[Ticket], bool] | None = None,
        max_batch: int = 1,
        linger_s: float = 0.0,
    ) -> list[Ticket] | None:
        """Block until `ticket` runs. At the front with nothing running, it heads a turn: the returned
        batch is `ticket` and up to `max_batch` - 1 followers from the front of the queue that `fits`
        accepts. When the latest batch had several members and the queue fell idle just now, the head
        waits up to `linger_s` for as many as it had plus those that arrived while it ran (the clients
        of a batch come back together). None: another head took `ticket` into its batch. Cancelled if
        `cancel` is set while waiting."""
        with self._cond:
            while ticket.state == "waiting" and not (self._running == 0 and self._waiting[0] is ticket):
                if cancel.is_set():
                    raise Cancelled("cancelled while waiting in the queue")
                self._cond.wait(0.02)
            if ticket.state != "waiting":
                return None
            batch = [self._take()]
            if max_batch > 1 and fits is not None and fits(ticket):
                now = time.monotonic()
                want = min(max_batch, self._last_batch + self._arrivals)
                deadline = now + linger_s if want > 1 and now - self._last_end < 0.1 else now
                while len(batch) < max_batch:
                    if self._waiting and fits(self._waiting[0]):
                        batch.append(self._take())
                        continue
                    now = time.monotonic()
                    if self._waiting or len(batch) >= want or now >= deadline:
                        break
                    self._cond.wait(deadline - now)
            self._last_batch = len(batch)
            self._arrivals = 0
            self._cond.notify_all()  # the followers' holders
            return batch

    def _take(self) -> Ticket:
        ticket = self._waiting.popleft()
        ticket.state = "running"
        ticket.started = time.perf_counter()
        self._running += 1
        return ticket

    def release(self, ticket: Ticket, *, measure: bool = True) -> None:
        """Free the place (once; later calls do nothing). A turn that ran is measured for the retry hint."""
        with self._cond:
            if ticket.state == "waiting":
                self._waiting.remove(ticket)
            elif ticket.state == "running":
                self._running -= 1
                if measure:
                    ms = (time.perf_counter() - ticket.started) * 1000
                    self._turn_ms = ms if not self._turn_ms else 0.8 * self._turn_ms + 0.2 * ms
                if self._running == 0:
                    self._last_end = time.monotonic()
            ticket.state = "done"
            self._cond.notify_all()

    @contextmanager
    def turn(self, cancel: threading.Event) -> Iterator[None]:
        """Hold a turn alone (no batch) for the duration of the block."""
        ticket = self.admit()
        ok = False
        try:
            self.start(ticket, cancel)
            yield
            ok = True
        finally:
            self.release(ticket, measure=ok)

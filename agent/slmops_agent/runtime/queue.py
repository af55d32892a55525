"""The bounded request queue, fair between clients: one turn at a time (a request alone or a batch
its head takes from the queue), clients served in turn, a running turn that pauses between tokens
while another client waits, and QueueFull with a retry hint past the bound or a client's cap."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from slmops_agent.errors import Cancelled, QueueFull

CLIENT_HEADER = "x-slmops-client"  # gRPC metadata key and HTTP header naming the client
MAX_CLIENT_KEY = 64


def client_key(declared: str | None, peer: str) -> str:
    """Who a request is from, for turn-taking: the peer's address without its port (every
    connection of one host is one client; local-socket callers are one client), refined by the
    key the caller declares in `CLIENT_HEADER` (cut to 64 printable characters). A declared key
    only splits the peer's own share: another host cannot take a local client's key."""
    host = peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer.split(":", 1)[0]
    key = "".join(c for c in (declared or "") if c.isprintable())[:MAX_CLIENT_KEY]
    return f"{host}/{key}" if key else host


class Ticket:
    """A place in the queue: waiting, then running (alone, at the head of a batch, or in another's
    batch), then done. `job` is what the holder asked for (the host's; the queue only carries it);
    `client` whose request it is; `size` how many running requests a paused turn stands for."""

    __slots__ = ("admitted", "client", "finished", "job", "outcome", "size", "started", "state")

    def __init__(self, job: Any = None, client: str = "", size: int = 1) -> None:
        self.admitted = time.monotonic()
        self.job = job
        self.client = client
        self.size = size
        self.state = "waiting"
        self.started = 0.0
        self.finished = threading.Event()
        self.outcome: Any = None


class RequestQueue:
    """A bounded queue of requests, fair between clients. One turn runs at a time: a request alone,
    or a batch its head takes from the queue (only requests the head's `fits` accepts, stopping at
    the first it refuses). The next head is the oldest request of the client served least recently
    (a client new or back from idle first), so clients take turns whatever each one queued. A turn
    calls `pause` between tokens: while a client with nothing in the turn waits, the turn steps
    aside and waits for its client's next turn, so another client's first token waits about one
    step. Past the bound, or past `client_bound` requests of one client: QueueFull with a retry hint
    from the recent time per turn."""

    def __init__(self, bound: int, client_bound: int | None = None) -> None:
        self.bound = bound
        self.client_bound = min(bound, client_bound or bound)
        self._cond = threading.Condition()
        self._waiting: dict[str, collections.deque[Ticket]] = {}  # client -> its waiting tickets
        self._count: dict[str, int] = {}  # client -> its requests waiting or running
        self._served: dict[str, int] = {}  # client -> when its latest turn began (a sequence number)
        self._seq = 0
        self._turn_clients: frozenset[str] = frozenset()  # the clients of the running turn
        self._queued = 0  # requests waiting (a paused turn counts its members)
        self._running = 0
        self._turn_ms = 0.0  # moving average of the time a turn takes
        self._last_batch = 1  # size of the latest batch
        self._arrivals = 0  # requests admitted while the latest batch ran
        self._last_end = 0.0  # when the queue last fell idle (monotonic)

    @property
    def depth(self) -> int:
        """Requests waiting or running."""
        return self._queued + self._running

    def retry_after_ms(self) -> int:
        """When a place is likely free: after the running turn, so the recent mean turn (1 s before
        any), within [50 ms, 60 s]."""
        return int(min(60_000.0, max(50.0, self._turn_ms or 1000.0)))

    def admit(self, job: Any = None, client: str = "") -> Ticket:
        """Take a place behind `client`'s other requests or raise QueueFull at once."""
        with self._cond:
            depth = self.depth
            if depth >= self.bound:
                raise QueueFull(
                    f"{depth} requests are queued (the bound is {self.bound}); retry later",
                    retry_after_ms=self.retry_after_ms(),
                )
            mine = self._count.get(client, 0)
            if mine >= self.client_bound:
                raise QueueFull(
                    f"this client has {mine} requests queued "
                    f"(the bound per client is {self.client_bound}); retry later",
                    retry_after_ms=self.retry_after_ms(),
                )
            ticket = Ticket(job, client)
            self._push(ticket)
            self._count[client] = mine + 1
            if self._running:
                self._arrivals += 1
            self._cond.notify_all()  # a head lingering for its batch
            return ticket

    def _push(self, ticket: Ticket, *, front: bool = False) -> None:
        queue = self._waiting.setdefault(ticket.client, collections.deque())
        if front:
            queue.appendleft(ticket)
        else:
            queue.append(ticket)
        self._queued += ticket.size

    def _head(self) -> Ticket | None:
        """The next turn's head: the front ticket of the client served least recently."""
        best: Ticket | None = None
        best_key = (0, 0.0)
        for client, queue in self._waiting.items():
            key = (self._served.get(client, 0), queue[0].admitted)
            if best is None or key < best_key:
                best, best_key = queue[0], key
        return best

    def _may_run(self, ticket: Ticket) -> bool:
        return self._running == 0 and self._head() is ticket

    def start(
        self,
        ticket: Ticket,
        cancel: threading.Event,
        *,
        fits: Callable[[Ticket], bool] | None = None,
        max_batch: int = 1,
        linger_s: float = 0.0,
    ) -> list[Ticket] | None:
        """Block until `ticket` runs. As the next head with nothing running, it heads a turn: the
        returned batch is `ticket` and up to `max_batch` - 1 followers, the next heads while `fits`
        accepts them. When the latest batch had several members and the queue fell idle just now,
        the head waits up to `linger_s` for as many as it had plus those that arrived while it ran
        (the clients of a batch come back together). None: another head took `ticket` into its
        batch. Cancelled if `cancel` is set while waiting."""
        with self._cond:
            while ticket.state == "waiting" and not self._may_run(ticket):
                if cancel.is_set():
                    raise Cancelled("cancelled while waiting in the queue")
                self._cond.wait(0.02)
            if ticket.state != "waiting":
                return None
            batch = [self._take(ticket)]
            if max_batch > 1 and fits is not None and fits(ticket):
                now = time.monotonic()
                want = min(max_batch, self._last_batch + self._arrivals)
                deadline = now + linger_s if want > 1 and now - self._last_end < 0.1 else now
                while len(batch) < max_batch:
                    head = self._head()
                    if head is not None and fits(head):
                        batch.append(self._take(head))
                        continue
                    now = time.monotonic()
                    if head is not None or len(batch) >= want or now >= deadline:
                        break
                    self._cond.wait(deadline - now)
            self._begin_turn(batch)
            self._last_batch = len(batch)
            self._arrivals = 0
            self._cond.notify_all()  # the followers' holders
            return batch

    def _take(self, ticket: Ticket) -> Ticket:
        queue = self._waiting[ticket.client]
        queue.remove(ticket)
        if not queue:
            del self._waiting[ticket.client]
        self._queued -= ticket.size
        self._running += ticket.size
        ticket.state = "running"
        ticket.started = time.perf_counter()
        return ticket

    def _begin_turn(self, batch: list[Ticket]) -> None:
        self._seq += 1
        self._turn_clients = frozenset(t.client for t in batch)
        for client in self._turn_clients:
            self._served[client] = self._seq

    def contended(self) -> bool:
        """Whether a client with nothing in the running turn waits (read without the lock: a hint)."""
        turn = self._turn_clients
        return any(client not in turn for client in list(self._waiting))

    def pause(self, batch: list[Ticket], cancelled: Callable[[], bool]) -> None:
        """Between tokens of the turn `batch`: while another client waits, step aside and wait for
        this client's next turn (the batch keeps its state; it is not taken apart). Returns at once
        when nobody else waits, and as soon as `cancelled()` says the turn has nothing left to run."""
        if not self.contended():
            return
        with self._cond:
            alive = [t for t in batch if t.state == "running"]
            if not alive or not self.contended():
                return
            turn = Ticket(None, alive[0].client, size=len(alive))
            self._running -= turn.size
            self._push(turn, front=True)
            self._cond.notify_all()
            while not self._may_run(turn) and not cancelled():
                self._cond.wait(0.02)
            self._take(turn)
            self._begin_turn(alive)
            turn.state = "done"

    def release(self, ticket: Ticket, *, measure: bool = True) -> None:
        """Free the place (once; later calls do nothing). A turn that ran is measured for the retry hint."""
        with self._cond:
            if ticket.state == "waiting":
                queue = self._waiting[ticket.client]
                queue.remove(ticket)
                if not queue:
                    del self._waiting[ticket.client]
                self._queued -= ticket.size
            elif ticket.state == "running":
                self._running -= 1
                if measure:
                    ms = (time.perf_counter() - ticket.started) * 1000
                    self._turn_ms = ms if not self._turn_ms else 0.8 * self._turn_ms + 0.2 * ms
                if self._running == 0:
                    self._last_end = time.monotonic()
            else:
                return
            ticket.state = "done"
            left = self._count[ticket.client] - 1
            if left:
                self._count[ticket.client] = left
            else:  # idle: its next request comes first
                del self._count[ticket.client]
                self._served.pop(ticket.client, None)
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

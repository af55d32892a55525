"""Events from a generation thread to the event loop that streams them.

onnxruntime-genai keeps the GIL while it computes a token, so each time the generation thread wakes
the loop, the two threads hand the GIL over before the next token can start. `Relay` wakes the
loop once for whatever piles up until the loop runs, and `next` joins consecutive text pieces:
a loop that keeps up still gets every token on its own, one that falls behind catches up in one
message instead of slowing the token loop down further.

The first text piece is the time to first token: its `put` waits (up to `FLUSH_WAIT_S`) until the
consumer has handled it (sent it on) and asks for more. Without that wait the generation thread goes
straight on to the next token with the GIL held, and the loop gets the first piece only after the
GIL's switch interval (5 ms). With `first_yield_s` the generation thread then pauses that long more:
where onnxruntime's threads take every core, the piece the loop has handed to gRPC (or the HTTP
server) still has to be written by its threads and read by the client's, and each waits for a core
until the scheduler preempts the token loop; a short pause (`FIRST_YIELD_S`) lets them run first
(benchmarks/README.md).

After the first piece, text is grouped in time: a text piece wakes the loop only when `group_s` has
passed since the last wake; one that comes sooner waits for the next event (the next piece, or the
end), so no piece is held back longer than `group_s` and one token's time. Every wake costs both
processes of a stream a few context switches and the generation thread a GIL handover, and on a small
CPU each one stalls onnxruntime's intra-op threads in the middle of a token. The default, 100 ms (10
updates a second), keeps the agent's decode rate close to the in-process loop's where shorter groups
cost it visibly (agent_bench; benchmarks/README.md). "start" (which model answers) never wakes the
loop: it comes with the first piece, so the prefill runs undisturbed; "done" and "error" always wake it.
`group_s=0` streams every piece as it comes.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Any

Event = tuple[str, Any]
FLUSH_WAIT_S = 0.01
FIRST_YIELD_S = 0.002
GROUP_S = 0.1


class Relay:
    def __init__(self, loop: asyncio.AbstractEventLoop, group_s: float = GROUP_S, first_yield_s: float = 0.0) -> None:
        self._loop = loop
        self._group_s = group_s
        self._first_yield_s = first_yield_s
        self._last_wake = float("-inf")
        self._lock = threading.Lock()
        self._pending: list[Event] = []
        self._woken = False
        self._ready = asyncio.Event()
        self._taken: collections.deque[Event] = collections.deque()
        self._first_text = True  # the next text `put` is the first
        self._first_given = False  # `next` has returned the first text
        self._drained = threading.Event()  # set when the consumer is back after the first text

    def put(self, kind: str, value: Any) -> bool:
        """From any thread; False when the loop is closed (nobody will read the event)."""
        now = time.monotonic()
        with self._lock:
            self._pending.append((kind, value))
            flush = kind == "text" and self._first_text
            if flush:
                self._first_text = False
                self._drained.clear()
            hold = kind == "start" or (kind == "text" and not flush and now - self._last_wake < self._group_s)
            wake = not self._woken and not hold
            if wake:
                self._woken, self._last_wake = True, now
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:
                return False
        # releases the GIL: the loop sends the first piece now; then the threads that carry it get a core
        if flush and self._drained.wait(FLUSH_WAIT_S) and self._first_yield_s > 0:
            time.sleep(self._first_yield_s)
        return True

    async def next(self) -> Event:
        """The next event, in order; consecutive ("text", ...) events come joined as one."""
        if self._first_given and not self._taken:
            self._drained.set()  # back for more after the first piece: it is on its way
        while not self._taken:
            await self._ready.wait()
            self._ready.clear()
            with self._lock:
                pending, self._pending = self._pending, []
                self._woken = False
            for kind, value in pending:
                if kind == "text" and self._taken and self._taken[-1][0] == "text":
                    self._taken[-1] = ("text", self._taken[-1][1] + value)
                else:
                    self._taken.append((kind, value))
        event = self._taken.popleft()
        self._first_given = self._first_given or event[0] == "text"
        return event

"""What may still be on its way to a device: the fleet's memory of its broadcasts, so that a blob
request that came before the chunks it asks for did is not answered by sending them again
(`distribution.BlobDistributor` keeps one `DeliveryLog`).

A broker delivers one publisher's messages on a topic to each subscriber in order, and a device
subscribes to `blobs/+/chunks` before it asks for anything. So a chunk broadcast after a device
started fetching (the fleet published its desired state, `fetch_started`, or the device first asked
for the blob) reaches it after its desired state, unless it is lost. Two ways to tell a request that
came before its chunks:

- Where the broker reports its delivery backlog (the embedded broker): chunks sent after the device
  started fetching while the broker has been busy since (or until less than `settle_s`, or twice the
  recent request round trip, ago). For a whole-blob request also chunks sent less than that long ago:
  the backlog counts a chunk only once the broker has it and is read at most every 0.1 s, so a request
  that comes right after the send would find the broker idle.
- Where it does not (Mosquitto, any external broker), only for a request the device marks `waiting`
  (it asked before, stayed connected since and got no bad chunk: `BlobRequest.waiting`) or its first
  whole-blob request: chunks broadcast after it started fetching and after every chunk it has (they
  are behind those in its queue at the broker), less than `in_flight_max_s` ago. A device that truly
  lost them asks again after its stall timer and gets them once they are that old; a request after a
  reconnect, a bad chunk or a failed blob is not marked and is answered at once.

A chunk the broker never acknowledged is forgotten (it may never have gone out), and a blob's
history is dropped once its newest chunk is `in_flight_max_s` old. With several workers the one
serving blob requests merges the chunks the others broadcast (`broadcast_record`), and a worker that
does not serve them notes the devices' requests, so that it knows since when they keep a blob's
chunks when it takes over.
"""

from __future__ import annotations

import time

Key = tuple[str, int]  # (blob sha256, chunk size)


class DeliveryLog:
    """When each chunk was last broadcast, and since when each device keeps a blob's chunks. Not
    thread-safe: the distributor calls it under its lock."""

    def __init__(self, *, backlog_known: bool, settle_s: float, in_flight_max_s: float) -> None:
        self.backlog_known = backlog_known
        self.settle_s = settle_s
        self.in_flight_max_s = in_flight_max_s
        self.last_busy = float("-inf")  # when the broker was last seen busy (backlog_known)
        self._sent_at: dict[Key, dict[int, float]] = {}  # when each chunk was last broadcast
        self._asked_at: dict[Key, dict[str, float]] = {}  # when each device first asked for it
        self._fetching: dict[str, tuple[int, float]] = {}  # device -> (generation, when its desired state went out)
        self._round_trip = 0.0  # recent longest time from a desired state going out to the device's first request

    def fetch_started(self, device_id: str, generation: int) -> None:
        if self._fetching.get(device_id, (None, 0.0))[0] != generation:
            self._fetching[device_id] = (generation, time.monotonic())

    def asked(self, key: Key, device_id: str, now: float) -> bool:
        """Note a request; True when it is the device's first for the blob (as far as the log goes)."""
        self._forget_old(key, now)
        asked = self._asked_at.setdefault(key, {})
        if device_id in asked:
            return False
        asked[device_id] = now
        fetching = self._fetching.get(device_id)
        if fetching is not None:
            self._round_trip = max(min(now - fetching[1], self.in_flight_max_s), 0.9 * self._round_trip)
        return True

    def noted(self, key: Key, device_id: str, now: float) -> None:
        """Note a request this worker does not serve (another one sends blobs), so that it knows since
        when the device keeps the blob's chunks should it serve them later. Notes of a blob nothing
        was sent of are forgotten after twice `in_flight_max_s` (oldest first)."""
        self.asked(key, device_id, now)
        if key not in self._sent_at:
            asked = self._asked_at[key]
            while asked and now - next(iter(asked.values())) >= 2 * self.in_flight_max_s:
                del asked[next(iter(asked))]

    def has_sent(self, key: Key, now: float | None = None) -> bool:
        """A chunk of the blob was sent (less than `in_flight_max_s` before `now`, where given)."""
        if now is not None:
            self._forget_old(key, now)
        return bool(self._sent_at.get(key))

    def merge(self, key: Key, sent: dict[int, float]) -> None:
        """Chunks another worker broadcast (`broadcast_record`), kept as if this one had sent them."""
        own = self._sent_at.setdefault(key, {})
        for index, at in sent.items():
            own[index] = max(at, own.get(index, at))

    def sent(self, key: Key, index: int) -> float:
        """A chunk was broadcast now; the time, for `unsent`."""
        at = time.monotonic()
        self._sent_at.setdefault(key, {})[index] = at
        return at

    def unsent(self, key: Key, index: int, at: float) -> None:
        """The broker never acknowledged the chunk broadcast at `at`: it may not be on its way."""
        sent = self._sent_at.get(key)
        if sent is not None and sent.get(index) == at:
            del sent[index]

    def on_the_way(self, key: Key, device_id: str, now: float, *, have: set[int], trusted: bool) -> set[int]:
        """The chunks of the blob that may still be on their way to the device, which has `have`;
        `trusted`: the request is marked waiting, or is the device's first whole-blob request."""
        sent = self._sent_at.get(key)
        if not sent:
            return set()
        since = self._since(key, device_id)
        if self.backlog_known:
            return {i for i, at in sent.items() if at >= since and self._busy_after(at, now)}
        if not trusted:
            return set()
        after = max((at for j, at in sent.items() if j in have and at >= since), default=since)
        return {i for i, at in sent.items() if at >= after and now - at < self.in_flight_max_s}

    def all_on_the_way(self, key: Key, count: int, device_id: str, now: float) -> bool:
        """Where the broker reports its backlog: every chunk was broadcast after the device started
        fetching, and the broker may still be delivering them."""
        sent = self._sent_at.get(key)
        if not self.backlog_known or not sent or len(sent) < count:
            return False
        oldest = min(sent.values())
        if oldest < self._since(key, device_id) or now - oldest >= self.in_flight_max_s:
            return False
        return self._busy_after(oldest, now) or now - oldest < self._settle()

    def _since(self, key: Key, device_id: str) -> float:
        """Since when the device keeps the blob's chunks (as far as the fleet can tell)."""
        asked = self._asked_at[key][device_id]
        fetching = self._fetching.get(device_id)
        return min(asked, fetching[1]) if fetching is not None else asked

    def _settle(self) -> float:
        return max(self.settle_s, 2 * self._round_trip)

    def _busy_after(self, sent_at: float, now: float) -> bool:
        """The broker was busy after the chunk was sent, and until less than the settle time ago."""
        if now - sent_at >= self.in_flight_max_s:
            return False
        return sent_at <= self.last_busy and now - self.last_busy < self._settle()

    def _forget_old(self, key: Key, now: float) -> None:
        """Drop a blob's send and request times once none of its chunks can still be on the way."""
        sent = self._sent_at.get(key)
        if sent and now - max(sent.values()) >= self.in_flight_max_s:
            del self._sent_at[key]
            self._asked_at.pop(key, None)

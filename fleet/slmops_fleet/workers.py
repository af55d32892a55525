"""Several fleet workers on one database and one external broker: who is alive, and what becomes
of the broker session of a worker that died.

- Each worker holds the lease `worker:<MQTT client id>` and renews it every `heartbeat_s` (expiry
  five heartbeats ahead). At start a worker claims its lease: it waits out a previous holder that
  may be alive (its own earlier process, killed, whose lease has not expired yet), takes one that
  stopped cleanly or is known dead at once, and refuses to start when another live process holds it
  (two workers given one client id would take the broker session from each other in turn).
- Each worker consumes device messages through shared subscriptions on a persistent broker session
  (`mqtt_client`): the broker keeps routing its share of messages to a worker's session while the
  worker is gone, and keeps what it had delivered but not yet seen acknowledged (the worker
  acknowledges a message only once it is committed). A worker whose lease expired (or whose holder
  is a process of this host that no longer runs) is dead: another worker takes its lease
  (`adopting:` holder), connects with its client id (`drain`), unsubscribes at once, applies what
  the session held, and ends the session; then it deletes the lease. Nothing a dead worker had not
  committed is lost, and devices' messages reach live workers only from then on.
- The embedded broker serves one worker: a worker with it refuses to start while another live worker
  uses the same database.
- Blob requests: every worker receives them; only the rollout driver's lease holder serves them, so
  a blob goes out once per wave whichever worker a device's request reached (`ingest`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from slmops_fleet.errors import StartupError
from slmops_fleet.mqtt_client import Ack, FleetMqtt, MqttEndpoint
from slmops_fleet.store import Store
from slmops_fleet.store.database import utcnow
from slmops_fleet.store.leases import dead_here
from slmops_protos.topics import Topics

log = logging.getLogger(__name__)

PREFIX = "worker:"
ADOPTING = "adopting:"
STOPPED = "stopped:"
TTL_HEARTBEATS = 5


def lease_name(client_id: str) -> str:
    return PREFIX + client_id


def _process(holder: str) -> str:
    """The "host:pid:random" part of a worker lease's holder."""
    for mark in (ADOPTING, STOPPED):
        if holder.startswith(mark):
            return holder[len(mark) :]
    return holder


class Workers:
    """This worker's presence in the database, and the draining of dead workers' sessions.

    `drain(client_id)` (run in a thread) takes over a dead worker's broker session, applies what it
    held and ends it; None where there is nothing to drain (the embedded broker)."""

    def __init__(
        self,
        store: Store,
        client_id: str,
        holder: str,
        *,
        heartbeat_s: float,
        drain: Callable[[str], bool] | None = None,
    ) -> None:
        self.store = store
        self.client_id = client_id
        self.holder = holder
        self.heartbeat_s = heartbeat_s
        self.ttl_s = heartbeat_s * TTL_HEARTBEATS
        self.drain = drain
        self.drained: list[str] = []  # client ids of dead workers whose sessions this worker drained
        self.renewals: list[Callable[[], None]] = []  # other leases this worker keeps at each heartbeat
        self._task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return lease_name(self.client_id)

    def claim(self) -> None:
        """Take this worker's lease, waiting out a holder that may be a dead earlier process of this
        worker (or a worker draining its session); StartupError when a live other process keeps it."""
        deadline = time.monotonic() + self.ttl_s + 2 * self.heartbeat_s
        while True:
            if self.store.acquire_lease(self.name, self.holder, self.ttl_s):
                return
            current = self.store.lease_holder(self.name)
            if current is not None:
                holder = current[0]
                if (holder.startswith(STOPPED) or dead_here(_process(holder))) and self.store.acquire_lease(
                    self.name, self.holder, self.ttl_s, take_from=holder
                ):
                    return
                if time.monotonic() > deadline:
                    raise StartupError(
                        f"another fleet worker ({_process(holder)}) runs with the MQTT client id {self.client_id}: "
                        "give each worker its own --worker-id (SLMOPS_FLEET_WORKER_ID)"
                    )
                log.info("waiting for %s to give up the worker id %s", holder, self.client_id)
            time.sleep(min(0.5, self.heartbeat_s))

    def others_alive(self) -> list[str]:
        """The holders of the other workers' unexpired leases."""
        now = utcnow()
        return [
            _process(holder)
            for name, holder, expires in self.store.leases_named(PREFIX)
            if name != self.name and expires > now and not holder.startswith(STOPPED)
        ]

    def step(self) -> None:
        """Renew this worker's lease, then drain the sessions of workers found dead."""
        if not self.store.acquire_lease(self.name, self.holder, self.ttl_s):
            log.error("worker lease %s was taken by another process; renewing it", self.name)
            current = self.store.lease_holder(self.name)
            self.store.acquire_lease(self.name, self.holder, self.ttl_s, take_from=current[0] if current else None)
        for renew in self.renewals:
            renew()
        if self.drain is None:
            return
        now = utcnow()
        for name, holder, expires in self.store.leases_named(PREFIX):
            if name == self.name:
                continue
            adopting = holder.startswith(ADOPTING)
            if expires > now and (adopting or not dead_here(_process(holder))):
                continue  # alive, or being drained by a live worker
            client_id = name[len(PREFIX) :]
            mine = ADOPTING + self.holder
            if not self.store.acquire_lease(name, mine, self.ttl_s * 12, take_from=holder):
                continue  # another worker took it first
            log.warning("fleet worker %s (%s) is gone: draining its broker session", client_id, _process(holder))
            try:
                drained = self.drain(client_id)
            except Exception:
                log.exception("draining the broker session of %s failed", client_id)
                drained = False
            if drained:
                self.drained.append(client_id)
                self.store.release_lease(name, mine)
                log.info("fleet worker %s: its broker session is drained and ended", client_id)
            else:  # try again (this or another worker) once this lease expires
                self.store.acquire_lease(name, mine, self.ttl_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="slmops-fleet-workers")

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.step)
            except Exception:
                log.exception("the worker presence step failed")
            await asyncio.sleep(self.heartbeat_s)

    async def stop(self) -> None:
        """Stop renewing; the lease stays until it expires, marked stopped: a restart of this worker
        takes it back at once, and otherwise another worker drains the session it leaves."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await asyncio.to_thread(
                self.store.acquire_lease, self.name, STOPPED + self.holder, self.ttl_s, take_from=self.holder
            )


def session_drainer(
    endpoint: MqttEndpoint,
    topics: Topics,
    share_group: str,
    on_message: Callable[[str, bytes, Ack], None],
    *,
    quiet_s: float = 1.0,
    max_s: float = 120.0,
) -> Callable[[str], bool]:
    """`drain(client_id)` for `Workers`: connect as the dead worker (MQTT 5, its persistent session),
    unsubscribe, hand every message the session held to `on_message` (blob requests are only
    acknowledged: their devices ask again), and once all are acknowledged and none came for
    `quiet_s`, end the session. False when it could not connect, or lost the session (its worker
    came back) before the end."""

    def drain(client_id: str) -> bool:
        mqtt = FleetMqtt(
            endpoint, topics, client_id=client_id, clean_session=False, mqtt5=True, share_group=share_group, drain=True
        )
        counts = {"received": 0, "acked": 0}

        def counted(ack: Ack) -> Ack:
            def done() -> None:
                counts["acked"] += 1
                ack()

            return done

        def handle(topic: str, payload: bytes, ack: Ack) -> None:
            counts["received"] += 1
            device_id = topics.device_of(topic)
            if device_id is not None and topic == topics.blob_requests(device_id):
                counted(ack)()
                return
            on_message(topic, payload, counted(ack))

        mqtt.set_handlers(handle)
        mqtt.start()
        try:
            if not mqtt.wait_connected(10.0):
                return False
            started = time.monotonic()
            while time.monotonic() - started < max_s:
                if not mqtt.connected:
                    return False
                quiet = time.monotonic() - max(mqtt.last_received, started)
                if quiet >= quiet_s and counts["acked"] >= counts["received"]:
                    log.info("drained %d messages from the session of %s", counts["received"], client_id)
                    mqtt.stop(end_session=True)
                    return True
                time.sleep(0.05)
            return False
        finally:
            mqtt.stop()

    return drain

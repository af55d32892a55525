"""Telemetry: the bounded SQLite queue, no loss while the broker is away, and no stall when it dies
with a batch in flight."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

from agent_helpers import AgentThread, FleetSim, agent_settings, save_credentials

from slmops_agent.telemetry import Sample, Telemetry, TelemetryQueue
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.states import UpdateState
from slmops_testing.brokers import MosquittoBroker


def sample(i: int) -> Sample:
    return Sample(
        timestamp_unix_ms=1000 + i,
        cpu_percent=float(i),
        memory_used_bytes=1,
        memory_total_bytes=2,
        disk_free_bytes=3,
        temperature_c=None if i % 2 else 40.0,
        requests_total=i,
        errors_total=0,
        tokens_per_s=0.0,
        ttft_ms=0.0,
        queue_depth=0,
        update_state=UpdateState.IDLE,
        active_package_id="",
    )


def test_queue_is_bounded_counts_drops_and_survives_reopening(tmp_path: Path) -> None:
    q = TelemetryQueue(tmp_path / "t.db", bound=5)
    seqs = [q.put(sample(i)) for i in range(8)]
    assert seqs == list(range(1, 9)) and len(q) == 5 and q.dropped_total == 3
    head = q.peek(2)
    assert [s.seq for s in head] == [4, 5] and head[0].requests_total == 3
    assert not head[0].HasField("temperature_c") and head[1].temperature_c == 40.0
    q.delete_upto(5)
    q.close()
    again = TelemetryQueue(tmp_path / "t.db", bound=5)
    assert [s.seq for s in again.peek(10)] == [6, 7, 8] and again.dropped_total == 3
    assert again.put(sample(9)) == 9  # sequence numbers never repeat


def test_samples_stay_queued_until_acknowledged(tmp_path: Path) -> None:
    q = TelemetryQueue(tmp_path / "t.db", bound=100)
    sent: list[fleet_pb2.TelemetryBatch] = []
    ack = {"ok": False}

    def publish(batch: fleet_pb2.TelemetryBatch, timeout: float) -> bool:
        sent.append(batch)
        return ack["ok"]

    t = Telemetry(
        q, device_id="d", interval_s=1, batch=2, collect=lambda: sample(0), publish=publish, is_connected=lambda: True
    )
    for _ in range(3):
        t.sample()
    assert t.flush() == 0 and len(q) == 3  # no acknowledgement: nothing deleted
    ack["ok"] = True
    assert t.flush() == 3 and len(q) == 0
    assert [len(b.samples) for b in sent[-2:]] == [2, 1] and sent[-1].device_id == "d"


def test_nothing_is_lost_while_the_broker_is_away(
    short_dir: Path, private_broker: MosquittoBroker, trusted_hex: str
) -> None:
    device = f"dev-{uuid.uuid4().hex[:8]}"
    root = f"tel/{uuid.uuid4().hex[:8]}"
    # the fleet's session survives the broker restart (persistence on, clean_session False)
    sim = FleetSim(root, port=private_broker.port, client_id=f"fleet-{uuid.uuid4().hex[:6]}")
    state = short_dir / "state"
    save_credentials(state, device, root, trusted_hex, port=private_broker.port)
    agent = AgentThread(agent_settings(state, telemetry_interval_s=0.1, telemetry_batch=7))
    try:
        sim.wait(lambda s: len(s.telemetry_seqs()) >= 3, timeout=20)
        private_broker.stop()
        telemetry = agent.agent.telemetry
        assert telemetry is not None
        deadline = time.monotonic() + 10
        while len(telemetry.queue) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(telemetry.queue) >= 10  # kept on the device while the broker is away
        private_broker.start()
        sim.wait(lambda s: len(set(s.telemetry_seqs())) >= 20, timeout=40)
        assert agent.agent.mqtt is not None and agent.agent.mqtt.connects >= 2  # it reconnected by itself
    finally:
        agent.stop()
    # after a clean stop everything the agent sampled has been delivered exactly or at least once
    time.sleep(0.5)
    seqs = set(sim.telemetry_seqs())
    assert seqs == set(range(1, max(seqs) + 1)), sorted(set(range(1, max(seqs) + 1)) - seqs)
    last = TelemetryQueue(state / "telemetry.db", bound=10)
    assert len(last) == 0 and last.dropped_total == 0
    assert sim.telemetry[-1].dropped_total == 0
    sim.close()


def test_the_agent_starts_while_the_broker_is_down_and_connects_later(
    short_dir: Path, private_broker: MosquittoBroker, trusted_hex: str
) -> None:
    device = f"dev-{uuid.uuid4().hex[:8]}"
    root = f"late/{uuid.uuid4().hex[:8]}"
    # the fleet's persistent session exists on the broker before it goes down, so nothing the device
    # sends after the broker is back can be missed, however fast the device reconnects
    sim = FleetSim(root, port=private_broker.port, client_id=f"fleet-{uuid.uuid4().hex[:6]}")
    private_broker.stop()
    state = short_dir / "state"
    save_credentials(state, device, root, trusted_hex, port=private_broker.port)
    agent = AgentThread(agent_settings(state, telemetry_interval_s=0.1))
    try:
        time.sleep(1.0)
        assert agent.agent.mqtt is not None and not agent.agent.mqtt.is_connected()
        telemetry = agent.agent.telemetry
        assert telemetry is not None and len(telemetry.queue) >= 3  # sampled while offline
        private_broker.start()
        sim.wait(lambda s: any(r.device_id == device for r in s.reported), timeout=30)
        sim.wait(lambda s: 1 in s.telemetry_seqs(), timeout=30)  # the first offline sample arrives
    finally:
        agent.stop()
        sim.close()


def test_a_publish_waiting_for_its_ack_ends_when_the_broker_dies(
    short_dir: Path, private_broker: MosquittoBroker, trusted_hex: str
) -> None:
    device = f"dev-{uuid.uuid4().hex[:8]}"
    state = short_dir / "state"
    save_credentials(state, device, f"ack/{uuid.uuid4().hex[:8]}", trusted_hex, port=private_broker.port)
    agent = AgentThread(agent_settings(state, telemetry_interval_s=60))  # the sampler stays out of the way
    try:
        mqtt = agent.agent.mqtt
        assert mqtt is not None and private_broker.process is not None
        deadline = time.monotonic() + 10
        while not mqtt.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mqtt.is_connected()
        os.kill(private_broker.process.pid, signal.SIGSTOP)  # connected, but nothing is acknowledged
        result: dict[str, bool] = {}
        batch = fleet_pb2.TelemetryBatch(device_id=device)
        waiter = threading.Thread(target=lambda: result.update(acked=mqtt.publish_telemetry(batch, 60.0)))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive()  # waiting for the broker's ack
        private_broker.process.kill()  # the connection drops with the batch in flight
        waiter.join(10)
        assert not waiter.is_alive() and result == {"acked": False}  # not the 60 s ack timeout
    finally:
        agent.stop()

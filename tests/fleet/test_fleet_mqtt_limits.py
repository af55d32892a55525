"""The largest MQTT packet a client may send, on both brokers: a 64 MiB PUBLISH from an enrolled device
ends its connection before the body is read (the fleet's memory hardly moves, /healthz answers
throughout, nothing reaches the fleet), while every message a device or the fleet sends legitimately
passes (the fleet's 1 MiB chunks included). Real sockets, a running fleet, a real Mosquitto."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from pydantic import ValidationError

from slmops_fleet.codec import chunk_to_pb
from slmops_fleet.mqtt_limits import DEFAULT_MAX_PACKET, OversizedPacket, PacketSizeGate, mosquitto_limits
from slmops_fleet.settings import MAX_CHUNK, FleetSettings
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.topics import Topics
from slmops_testing.attacks import Watch, send_oversized_publish
from slmops_testing.fleet_api import enroll_two_and_roll_out
from slmops_testing.packages import random_bytes
from slmops_testing.simulated_devices import SimDevice

HUGE = 64 * (1 << 20)
MB = 1 << 20


class _Bytes:
    """A reader over fixed bytes, handing them out in the sizes asked for (amqtt's reads)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self, n: int = -1) -> bytes:
        n = len(self.data) if n < 0 else n
        out, self.data = self.data[:n], self.data[n:]
        return out

    def feed_eof(self) -> None:
        pass


def _packet(kind: int, body: bytes) -> bytes:
    length, value = bytearray(), len(body)
    while True:
        byte, value = value & 0x7F, value >> 7
        length.append(byte | (0x80 if value else 0))
        if not value:
            return bytes([kind]) + bytes(length) + body


def _read_all(data: bytes, limit: int, sizes: list[int]) -> tuple[bytes, list[int]]:
    seen: list[int] = []
    gate = PacketSizeGate(_Bytes(data), limit, seen.append)  # type: ignore[arg-type]

    async def run() -> bytes:
        out = b""
        i = 0
        while True:
            piece = await gate.read(sizes[i % len(sizes)])
            i += 1
            if not piece:
                return out
            out += piece

    return asyncio.run(run()), seen


@pytest.mark.parametrize("sizes", [[1], [1, 1, 7], [3], [4096]], ids=["bytewise", "mixed", "three", "bulk"])
def test_the_gate_follows_the_framing_however_it_is_read(sizes: list[int]) -> None:
    packets = [_packet(0x30, b"t" * n) for n in (0, 1, 127, 128, 16383, 16384, 1000)]
    data = b"".join(packets)
    out, seen = _read_all(data, 16384, sizes)
    assert out == data and seen == []
    with pytest.raises(OversizedPacket, match="16385 bytes"):
        _read_all(data + _packet(0x30, b"x" * 16385) + packets[0], 16384, sizes)


def test_the_gate_refuses_before_the_body_and_a_malformed_length() -> None:
    seen: list[int] = []
    head = b"\x30" + bytes([0x80, 0x80, 0x80, 0x20])  # 64 MiB announced; no body follows
    gate = PacketSizeGate(_Bytes(head + b"body"), MB, seen.append)  # type: ignore[arg-type]

    async def run() -> list[bytes]:
        return [await gate.read(1) for _ in range(5)]

    with pytest.raises(OversizedPacket):
        asyncio.run(run())
    assert seen == [HUGE] and gate.inner.data == b"body"  # type: ignore[attr-defined]
    with pytest.raises(OversizedPacket, match="malformed"):
        _read_all(b"\x30\xff\xff\xff\xff\x01", 1 << 30, [1])


def test_the_default_limit_takes_every_message_a_device_or_the_fleet_sends() -> None:
    """The largest legitimate messages, each field at its largest: a 10,000-sample telemetry batch (the
    most the fleet takes), a blob request with the most chunk indexes an agent lists, a 1 MiB chunk."""
    top = 2**64 - 1
    sample = fleet_pb2.TelemetrySample(
        timestamp_unix_ms=2**63 - 1, cpu_percent=99.9, memory_used_bytes=top, memory_total_bytes=top,
        disk_free_bytes=top, temperature_c=99.9, requests_total=top, errors_total=top, tokens_per_s=1e9,
        ttft_ms=1e9, queue_depth=2**32 - 1, update_state=fleet_pb2.ROLLED_BACK, active_package_id="f" * 64, seq=top,
    )  # fmt: skip
    settings = FleetSettings(data_dir=Path("/nonexistent"))
    batch = fleet_pb2.TelemetryBatch(
        device_id="d" * 128, samples=[sample] * settings.telemetry_max_samples, dropped_total=top
    )
    request = fleet_pb2.BlobRequest(
        device_id="d" * 128, blob_sha256="f" * 64, missing=range(2**32 - 65_536, 2**32), chunk_size=2**32 - 1
    )
    chunk = chunk_to_pb("f" * 64, 2**32 - 2, 2**32 - 1, 2**64 - 1, MAX_CHUNK, b"\xff" * MAX_CHUNK)
    topic = Topics("a/long/topic/root/" * 8)
    sizes = {
        "telemetry": len(batch.SerializeToString()) + len(topic.telemetry("d" * 128)) + 2,
        "blob request": len(request.SerializeToString()) + len(topic.blob_requests("d" * 128)) + 2,
        "chunk": len(chunk) + len(topic.blob_chunks("f" * 64)) + 4,
    }
    assert settings.mqtt_max_packet_bytes == DEFAULT_MAX_PACKET
    assert all(size <= DEFAULT_MAX_PACKET for size in sizes.values()), sizes
    assert sizes["telemetry"] > 0.85 * DEFAULT_MAX_PACKET, sizes  # "a little above", not far above


def test_the_limit_must_leave_room_for_the_fleets_chunks(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="room for the fleet's chunks"):
        FleetSettings(data_dir=tmp_path, chunk_size=MAX_CHUNK, mqtt_max_packet_bytes=MAX_CHUNK + 100)
    assert FleetSettings(data_dir=tmp_path, chunk_size=MAX_CHUNK, mqtt_max_packet_bytes=MAX_CHUNK + 4096)
    assert mosquitto_limits(DEFAULT_MAX_PACKET) == ["max_packet_size 2097157", "message_size_limit 2097152"]


@pytest.fixture(params=["embedded", "mosquitto"])
def broker_fleet(
    request: pytest.FixtureRequest, fleet_settings: Callable[..., Any], tmp_path: Path
) -> Iterator[tuple[Any, psutil.Process | None]]:
    """A running fleet with 1 MiB chunks on the embedded broker or on a Mosquitto of its own (with the
    broker's process, whose memory is watched too)."""
    from slmops_fleet.process import FleetThread
    from slmops_testing.brokers import start_mosquitto

    if request.param == "embedded":
        with FleetThread(fleet_settings(chunk_size=MAX_CHUNK)) as fleet:
            yield fleet, None
        return
    broker = start_mosquitto(tmp_path / "mosquitto")
    try:
        assert broker.process is not None
        with FleetThread(fleet_settings(chunk_size=MAX_CHUNK, broker_url=broker.url)) as fleet:
            yield fleet, psutil.Process(broker.process.pid)
    finally:
        broker.stop()


def test_a_64_mib_publish_is_refused_and_the_fleet_serves_on(
    broker_fleet: tuple[Any, psutil.Process | None], fleet_package: Callable[..., Path]
) -> None:
    fleet, mosquitto = broker_fleet
    data = random_bytes(3 * MAX_CHUNK + 1000, 41)
    sha = hashlib.sha256(data).hexdigest()
    a, b = enroll_two_and_roll_out(fleet, fleet_package({"weights.bin": data}))
    topics = Topics(fleet.settings.topic_root)
    host, port = a["mqtt"]["host"], a["mqtt"]["port"]
    ingest = fleet.server.ingest
    before = (ingest.counters.telemetry_batches, ingest.counters.malformed)
    broker_rss = mosquitto.memory_info().rss if mosquitto else 0
    with Watch(fleet.url) as watch:
        started = time.monotonic()
        admitted, sent = send_oversized_publish(
            host, port, username=a["mqtt"]["username"], password=a["mqtt"]["password"],
            client_id=a["device_id"], topic=topics.telemetry(a["device_id"]), size=HUGE,
        )  # fmt: skip
        took = time.monotonic() - started
        broker_peak = mosquitto.memory_info().rss if mosquitto else 0
    assert admitted
    assert sent < 16 * MB, f"the broker read {sent / MB:.0f} MiB of a 64 MiB packet over {took:.1f} s"
    assert watch.rss_peak - watch.rss_before < 8 * MB, (watch.rss_before, watch.rss_peak)
    assert broker_peak - broker_rss < 8 * MB, (broker_rss, broker_peak)
    assert watch.statuses == {200} and max(watch.latencies) < 2.0, watch.latencies
    assert (ingest.counters.telemetry_batches, ingest.counters.malformed) == before
    with httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {fleet.admin_token}"}) as admin:
        counted = admin.get("/v1/status").json()["limits"]["mqtt_oversized_packets"]
    assert counted == (1 if mosquitto is None else None)  # Mosquitto logs its own refusals
    # The device may connect again, and the fleet's 1 MiB chunks still reach both devices.
    devices = [SimDevice.enrolled(creds) for creds in (a, b)]
    try:
        for dev in devices:
            assert not dev.connect().is_failure
            dev.subscribe_device_topics()
            assert dev.desired().chunk_size == MAX_CHUNK
        for dev in devices:
            dev.request_blob(sha)
        for dev in devices:
            assert dev.wait_blob(sha) == data
    finally:
        for dev in devices:
            dev.close()


def test_an_anonymous_64_mib_connect_is_cut_off_before_authentication(fleet: Any) -> None:
    """The size gate sits under the CONNECT too: a client announcing a 64 MiB CONNECT (a will payload or
    a password could be that large) is dropped on the header, before anyone knows who it is."""
    import socket

    port = fleet.info.mqtt.port
    with Watch(fleet.url) as watch:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sent = 0
        try:
            sock.sendall(b"\x10\x80\x80\x80\x20")  # CONNECT, remaining length 64 MiB
            while sent < HUGE:
                sock.sendall(b"\0" * 65536)
                sent += 65536
        except OSError:
            pass
        finally:
            sock.close()
    assert sent < 16 * MB, sent
    assert watch.rss_peak - watch.rss_before < 8 * MB and watch.statuses == {200}
    assert fleet.server.broker.counters.oversized_packets == 1


def test_status_counts_what_devices_had_refused(
    fleet_settings: Callable[..., Any], fleet_package: Callable[..., Path]
) -> None:
    """Every limit's counter shows in /v1/status (`limits`) and in `slmops fleet status`: a will outside
    the ACL, an oversized packet, blob requests over the rate and in another chunk size, a telemetry
    batch over the sample limit, a malformed message."""
    import json

    from click.testing import CliRunner

    from slmops_cli.main import app
    from slmops_fleet.process import FleetThread

    settings = fleet_settings(blob_request_rate=0.01, blob_request_burst=2, telemetry_max_samples=3)
    with FleetThread(settings) as fleet:
        data = random_bytes(1000, 43)
        a, b = enroll_two_and_roll_out(fleet, fleet_package({"weights.bin": data}))
        topics = Topics(fleet.settings.topic_root)
        thief = SimDevice.enrolled(a)
        thief.client.will_set(topics.reported(b["device_id"]), b"x", qos=1)
        assert thief.connect().is_failure  # a will on another device's topic
        thief.close()
        send_oversized_publish(
            "127.0.0.1", fleet.info.mqtt.port, username=a["mqtt"]["username"], password=a["mqtt"]["password"],
            client_id=a["device_id"], topic=topics.telemetry(a["device_id"]), size=8 * MB,
        )  # fmt: skip
        dev = SimDevice.enrolled(a)
        assert not dev.connect().is_failure
        try:
            sha = hashlib.sha256(data).hexdigest()
            dev.request_blob(sha, missing=[0], chunk_size=300_000)  # some chunks in another size: refused
            dev.request_blob(sha)
            dev.request_blob(sha)  # past the burst of 2: dropped
            samples = [fleet_pb2.TelemetrySample(seq=i, timestamp_unix_ms=i) for i in range(4)]
            batch = fleet_pb2.TelemetryBatch(device_id=a["device_id"], samples=samples)
            dev.publish(topics.telemetry(a["device_id"]), batch.SerializeToString())
            dev.publish(topics.reported(a["device_id"]), b"\xff\xff not protobuf")
            assert fleet.server.ingest.wait_idle(10)
        finally:
            dev.close()
        with httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {fleet.admin_token}"}) as admin:
            limits = admin.get("/v1/status").json()["limits"]
        expected = {
            "mqtt_oversized_packets": 1, "mqtt_wills_refused": 1, "blob_requests_rate_limited": 1,
            "blob_requests_refused_chunk_size": 1, "telemetry_batches_refused": 1, "messages_malformed": 1,
        }  # fmt: skip
        assert {k: limits[k] for k in expected} == expected, limits
        env = {"SLMOPS_FLEET_URL": fleet.url, "SLMOPS_FLEET_TOKEN": fleet.admin_token}
        out = CliRunner().invoke(app, ["fleet", "status"], env=env, terminal_width=200)
        assert out.exit_code == 0, out.output
        lines = {line.strip("│ ").split("│")[0].strip(): line for line in out.output.splitlines() if "│" in line}
        assert "1" in lines["refused: MQTT packets over the size limit"]
        assert "1" in lines["refused: wills outside a device's ACL"]
        out = CliRunner().invoke(app, ["fleet", "status", "--json"], env=env)
        assert json.loads(out.output)["limits"]["mqtt_wills_refused"] == 1

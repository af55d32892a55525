"""What the hostile-device tests share: a watch on the fleet while an attack runs (its resident memory
and /healthz's latency) and an oversized MQTT PUBLISH sent on a raw socket, so that nothing of a
client library buffers it first."""

from __future__ import annotations

import socket
import struct
import threading
import time

import httpx
import psutil


class Watch:
    """Samples this process's resident memory and /healthz's latency while an attack runs (the fleet
    runs in this process, as a FleetThread)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.rss_before = psutil.Process().memory_info().rss
        self.rss_peak = self.rss_before
        self.latencies: list[float] = []
        self.statuses: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                self.statuses.add(client.get("/healthz").status_code)
                self.latencies.append(time.monotonic() - start)
                self.rss_peak = max(self.rss_peak, psutil.Process().memory_info().rss)
                time.sleep(0.02)

    def _wait_for_samples(self, count: int) -> None:
        deadline = time.monotonic() + 10
        while len(self.latencies) < count and time.monotonic() < deadline:
            time.sleep(0.01)

    def __enter__(self) -> Watch:
        self._thread.start()
        self._wait_for_samples(1)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._wait_for_samples(len(self.latencies) + 2)  # the fleet still answers after the attack
        self._stop.set()
        self._thread.join()


def _string(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("!H", len(raw)) + raw


def _length(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def send_oversized_publish(
    host: str, port: int, *, username: str, password: str, client_id: str, topic: str, size: int
) -> tuple[bool, int]:
    """Connect as a device (MQTT 3.1.1, raw socket), then send a QoS 0 PUBLISH of `size` payload bytes
    in 64 KiB pieces until the broker ends the connection. Returns (whether it was admitted, the
    payload bytes sent before the connection ended)."""
    body = _string("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 30)
    body += _string(client_id) + _string(username) + _string(password)
    sock = socket.create_connection((host, port), timeout=10)
    sent = 0
    try:
        sock.sendall(b"\x10" + _length(len(body)) + body)
        connack = sock.recv(4)
        if len(connack) < 4 or connack[3] != 0:
            return False, 0
        head = _string(topic)
        sock.sendall(b"\x30" + _length(len(head) + size) + head)
        piece = b"\0" * 65536
        sock.settimeout(5)
        while sent < size:
            sock.sendall(piece[: size - sent])
            sent += min(len(piece), size - sent)
    except OSError:  # reset or timed out: the broker stopped reading
        pass
    finally:
        sock.close()
    return True, sent

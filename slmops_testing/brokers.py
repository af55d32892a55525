"""A Mosquitto 2 broker of the tests' own: generated config, dynamic security, persistence.

`start_mosquitto(workdir, port=None) -> MosquittoBroker` (`.url`, `.stop()`, `.kill()`, `.restart()`),
optionally on another address, over TLS (`openssl_ca` makes a CA and a server certificate with the
openssl command, independent of the fleet's own CA code), inside a network namespace;
`CorruptingProxy(host, port)`: a TCP relay that corrupts the first chunk a client receives.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from slmops_fleet.mqtt_limits import DEFAULT_MAX_PACKET, mosquitto_limits
from slmops_testing.netns import Netns


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_CTRL = shutil.which("mosquitto_ctrl") or "/usr/bin/mosquitto_ctrl"
DYNSEC_PLUGIN = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")


# --- certificates ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerCerts:
    ca: Path  # the CA certificate clients verify the server with
    cert: Path
    key: Path


def openssl_ca(workdir: Path, host: str, *, name: str = "test") -> ServerCerts:
    """A fresh CA and a server certificate for `host` (an IP address) made by `openssl`."""
    workdir.mkdir(parents=True, exist_ok=True)
    certs = ServerCerts(workdir / f"{name}-ca.pem", workdir / f"{name}-server.pem", workdir / f"{name}-server.key")
    ca_key, csr, ext = workdir / f"{name}-ca.key", workdir / f"{name}-server.csr", workdir / f"{name}-ext.cnf"
    ext.write_text(f"subjectAltName=IP:{host},IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    sign = ["-extfile", ext, "-out", certs.cert]
    for cmd in (
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", certs.ca, "-days", "2", "-subj", f"/CN={name} CA"],
        ["req", *ec, "-keyout", certs.key, "-out", csr, "-subj", f"/CN={host}"],
        ["x509", "-req", "-in", csr, "-CA", certs.ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2", *sign],
    ):
        subprocess.run(["openssl", *map(str, cmd)], check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return certs


# --- Mosquitto ------------------------------------------------------------------------------------------


@dataclass
class MosquittoBroker:
    host: str
    port: int
    admin_username: str
    admin_password: str
    workdir: Path
    conf: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    tls: ServerCerts | None = None
    netns: Netns | None = None

    @property
    def url(self) -> str:
        """mqtt[s]://admin:password@host:port: the fleet's --broker-url (and --broker-admin-url)."""
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{self.admin_username}:{self.admin_password}@{self.host}:{self.port}"

    def _listening(self) -> bool:
        def probe() -> bool:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return True
            except OSError:
                return False

        return self.netns.call(probe) if self.netns else probe()

    def start(self, timeout: float = 10.0) -> None:
        log = self.log.open("ab")
        self.process = subprocess.Popen(
            [*(self.netns.prefix if self.netns else []), MOSQUITTO, "-c", str(self.conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited ({self.process.returncode}):\n{self.log.read_text()[-2000:]}")
            if self._listening():
                return
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """SIGTERM: Mosquitto saves its persistence file and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: what the broker had not autosaved (autosave_interval 1) is lost."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def start_mosquitto(
    workdir: Path,
    *,
    port: int | None = None,
    anonymous: bool = False,
    host: str = "127.0.0.1",
    tls: ServerCerts | None = None,
    netns: Netns | None = None,
    max_packet_bytes: int = DEFAULT_MAX_PACKET,
) -> MosquittoBroker:
    """A Mosquitto 2 broker with persistence and size limits, in `workdir`: with dynamic security
    (an admin, anonymous off) by default, or open to anonymous clients when `anonymous`; on `host`,
    TLS only with `tls`, run inside `netns` when given. Packets over `max_packet_bytes` end their
    connection (the fleet's `mqtt_max_packet_bytes`)."""
    if not Path(MOSQUITTO).exists() or not (anonymous or DYNSEC_PLUGIN.exists()):
        pytest.fail(f"these tests need mosquitto 2 with its dynamic security plugin ({MOSQUITTO}, {DYNSEC_PLUGIN})")
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    dynsec = workdir / "dynamic-security.json"
    admin, password = "slmops-admin", secrets.token_urlsafe(16)
    if anonymous:
        security = ["allow_anonymous true"]
    else:
        subprocess.run(
            [MOSQUITTO_CTRL, "dynsec", "init", str(dynsec), admin, password],
            check=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
        )
        security = ["allow_anonymous false", f"plugin {DYNSEC_PLUGIN}", f"plugin_opt_config_file {dynsec}"]
    port = port or (8883 if netns else free_port())
    listener = [f"listener {port} {host}"]
    if tls:
        listener += [f"cafile {tls.ca}", f"certfile {tls.cert}", f"keyfile {tls.key}", "tls_version tlsv1.2"]
    conf = workdir / "generated.conf"
    conf.write_text(
        "\n".join(
            [
                *listener,
                *security,
                "persistence true",
                f"persistence_location {data}/",
                "autosave_interval 1",
                *mosquitto_limits(max_packet_bytes),
                "max_inflight_bytes 16777216",
                "max_queued_bytes 268435456",
                "max_queued_messages 100000",
                # Started as root it would drop to user `mosquitto`, which cannot read this folder.
                "user root",
                "log_dest stdout",
                "log_type error",
                "log_type warning",
                "log_type notice",
                "",
            ]
        )
    )
    broker = MosquittoBroker(
        host, port, admin, password, workdir, conf, workdir / "mosquitto.log", tls=tls, netns=netns
    )
    broker.start()
    return broker


# --- a fault on the wire ---------------------------------------------------------------------------------


class CorruptingProxy:
    """A TCP relay from 127.0.0.1:`port` to a broker that flips the last byte of the first `flips`
    PUBLISH packets (broker -> client) whose topic contains `topic_part`: MQTT has no checksum, so
    the client receives the bad bytes as they are. For a BlobChunk the last byte is chunk data, so
    the chunk's own SHA-256 no longer matches. `flipped` lists the topics it corrupted."""

    def __init__(self, host: str, port: int, *, topic_part: str = "/chunks", flips: int = 1) -> None:
        self.target = (host, port)
        self.topic_part = topic_part.encode()
        self.flips_left = flips
        self.flipped: list[str] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._closing = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="corrupting-proxy", daemon=True).start()

    def close(self) -> None:
        self._closing = True
        self._server.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        buf = bytearray()
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not downstream:
                    dst.sendall(data)
                    continue
                buf += data
                while (packet := _take_packet(buf)) is not None:
                    dst.sendall(self._maybe_corrupt(packet))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _maybe_corrupt(self, packet: bytearray) -> bytearray:
        if packet[0] >> 4 != 3:  # not a PUBLISH
            return packet
        offset = 1
        while packet[offset] & 0x80:  # the remaining-length varint
            offset += 1
        offset += 1
        topic_len = int.from_bytes(packet[offset : offset + 2], "big")
        topic = bytes(packet[offset + 2 : offset + 2 + topic_len])
        with self._lock:
            if self.flips_left <= 0 or self.topic_part not in topic:
                return packet
            self.flips_left -= 1
            self.flipped.append(topic.decode())
        packet[-1] ^= 0xFF
        return packet


def _take_packet(buf: bytearray) -> bytearray | None:
    """Remove and return one whole MQTT packet from the front of `buf`, or None if it is incomplete."""
    length, multiplier, offset = 0, 1, 1
    while True:
        if offset >= len(buf):
            return None
        byte = buf[offset]
        length += (byte & 0x7F) * multiplier
        multiplier *= 128
        offset += 1
        if not byte & 0x80:
            break
    end = offset + length
    if len(buf) < end:
        return None
    packet = buf[:end]
    del buf[:end]
    return packet

"""A Mosquitto 2 broker of the tests' own: generated config, dynamic security, persistence.

`start_mosquitto(workdir, port=None) -> MosquittoBroker` (`.url`, `.stop()`, `.kill()`, `.restart()`).
"""

from __future__ import annotations

import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_CTRL = shutil.which("mosquitto_ctrl") or "/usr/bin/mosquitto_ctrl"
DYNSEC_PLUGIN = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")


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

    @property
    def url(self) -> str:
        """mqtt://admin:password@host:port: the fleet's --broker-url (and --broker-admin-url)."""
        return f"mqtt://{self.admin_username}:{self.admin_password}@{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        log = self.log.open("ab")
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited ({self.process.returncode}):\n{self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
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


def start_mosquitto(workdir: Path, *, port: int | None = None, anonymous: bool = False) -> MosquittoBroker:
    """A Mosquitto 2 broker with persistence and size limits, in `workdir`: with dynamic security
    (an admin, anonymous off) by default, or open to anonymous clients when `anonymous`."""
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
    port = port or free_port()
    conf = workdir / "generated.conf"
    conf.write_text(
        "\n".join(
            [
                f"listener {port} 127.0.0.1",
                *security,
                "persistence true",
                f"persistence_location {data}/",
                "autosave_interval 1",
                "message_size_limit 8388608",
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
    broker = MosquittoBroker("127.0.0.1", port, admin, password, workdir, conf, workdir / "mosquitto.log")
    broker.start()
    return broker

"""Hosts of the tests' own: Linux network namespaces joined by a bridge, for cross-host tests.

`HostNetwork.create(n_hosts)` makes a hub namespace holding a bridge (`br0`, 10.213.0.1/24) and
`n_hosts` more, each joined to the bridge by a veth pair (`eth0`, 10.213.0.2, .3, ...). Every
address is on an interface the test made, inside namespaces the test made; nothing is routed
anywhere else (no default route, no address in the test's own namespace). `lo` is up in each.

- `Netns.prefix`: the command prefix that runs a program inside (`ip netns exec NAME`);
- `Netns.call(fn, *args)`: runs `fn` in a thread that joined the namespace (its sockets live there);
- `HostNetwork.remove()` deletes every namespace (their interfaces go with them); `create` first
  removes namespaces of this module's prefix whose process is gone.

Namespaces need root (CAP_SYS_ADMIN): `create` raises `NetnsUnavailable` with the kernel's reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

PREFIX = "slm-"
SUBNET = "10.213.0"
CLONE_NEWNET = 0x40000000
_serial = count()


class NetnsUnavailable(RuntimeError):
    """The kernel or the user's rights refuse network namespaces."""


def _new_namespace(name: str) -> None:
    """An empty namespace with `lo` up and IPv6 off (no link-local chatter on the test's links)."""
    _ip("netns", "add", name)
    for key in ("all", "default"):
        _run(["ip", "netns", "exec", name, "sysctl", "-q", "-w", f"net.ipv6.conf.{key}.disable_ipv6=1"])
    _ip("-n", name, "link", "set", "lo", "up")


def _ip(*args: str) -> None:
    _run(["ip", *args])


def _run(cmd: list[str]) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
    except FileNotFoundError:
        raise NetnsUnavailable(f"`{cmd[0]}` is not installed") from None
    if proc.returncode != 0:
        raise NetnsUnavailable(f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip()}")


@dataclass(frozen=True)
class Netns:
    name: str
    address: str  # its address on the test's network

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 60.0) -> T:
        """`fn(*args)` in a thread inside this namespace; its result, or its exception raised here."""
        result: list[T] = []
        error: list[BaseException] = []

        def main() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns into {self.name} failed")
                finally:
                    os.close(fd)
                result.append(fn(*args))
            except BaseException as exc:
                error.append(exc)

        thread = threading.Thread(target=main, name=f"netns-{self.name}", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"a call inside {self.name} took more than {timeout:.0f} s")
        if error:
            raise error[0]
        return result[0]


@dataclass
class HostNetwork:
    hub: Netns
    hosts: list[Netns] = field(default_factory=list)

    @classmethod
    def create(cls, n_hosts: int) -> HostNetwork:
        remove_leftovers()
        base = f"{PREFIX}{os.getpid()}-{next(_serial)}"
        hub = Netns(f"{base}-hub", f"{SUBNET}.1")
        net = cls(hub)
        try:
            _new_namespace(hub.name)
            _ip("-n", hub.name, "link", "add", "br0", "type", "bridge")
            _ip("-n", hub.name, "addr", "add", f"{hub.address}/24", "dev", "br0")
            _ip("-n", hub.name, "link", "set", "br0", "up")
            for i in range(n_hosts):
                host = Netns(f"{base}-h{i}", f"{SUBNET}.{i + 2}")
                _new_namespace(host.name)
                net.hosts.append(host)
                _ip("-n", hub.name, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", host.name)
                _ip("-n", hub.name, "link", "set", f"p{i}", "master", "br0")
                _ip("-n", hub.name, "link", "set", f"p{i}", "up")
                _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
                _ip("-n", host.name, "link", "set", "eth0", "up")
        except BaseException:
            net.remove()
            raise
        return net

    @property
    def namespaces(self) -> list[Netns]:
        return [self.hub, *self.hosts]

    def remove(self) -> None:
        for ns in reversed(self.namespaces):
            with contextlib.suppress(FileNotFoundError):  # no `ip`: nothing was made
                subprocess.run(
                    ["ip", "netns", "del", ns.name], capture_output=True, stdin=subprocess.DEVNULL, timeout=30
                )


def remove_leftovers() -> None:
    """Delete namespaces this module made in processes that are gone (a test killed mid-way)."""
    netns_dir = Path("/var/run/netns")
    if not netns_dir.is_dir():
        return
    for path in netns_dir.iterdir():
        if not path.name.startswith(PREFIX):
            continue
        pid = path.name[len(PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            subprocess.run(["ip", "netns", "del", path.name], capture_output=True, stdin=subprocess.DEVNULL, timeout=30)

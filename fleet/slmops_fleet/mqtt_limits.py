"""The largest MQTT packet a client may send, and the embedded broker's gate that enforces it.

amqtt reads a packet's whole body with one `readexactly(remaining length)`: a client announcing a
64 MiB PUBLISH makes it buffer 64 MiB before any plugin sees the message, and it has no limit of its
own. `PacketSizeGate` sits under every client connection of the embedded broker (the CONNECT
included), follows the MQTT framing as amqtt reads, and ends the connection as soon as a fixed
header announces more than the limit, before one byte of that body is read. Mosquitto does the same
with `max_packet_size` (`mosquitto_limits` gives the lines, one home for the figure); a sample
configuration for deployments is `fleet/deploy/mosquitto.conf`.

The default limit is a little above the largest message a device or the fleet sends legitimately:
a TelemetryBatch of the most samples the fleet takes (10,000: 1.45 MB typical, 1.89 MB with every
field at its largest), a BlobRequest of the most chunk indexes an agent lists (65,536: 0.33 MB), a
ReportedState (a few KB), and the fleet's own chunks (1 MiB at most plus a header under 300 bytes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from amqtt.adapters import ReaderAdapter

log = logging.getLogger(__name__)

DEFAULT_MAX_PACKET = 2 * 1024 * 1024
CHUNK_HEADER_ALLOWANCE = 4096  # a BlobChunk's topic and fields besides its data, with room to spare
_MAX_LENGTH_BYTES = 4  # MQTT's remaining length is at most four bytes long


class OversizedPacket(ConnectionError):
    """A client announced a packet larger than the limit (or a malformed length): its connection ends."""


@dataclass
class BrokerCounters:
    """What the embedded broker refused since the fleet started."""

    oversized_packets: int = 0  # connections ended for a packet over the limit
    wills_refused: int = 0  # CONNECTs refused for a will outside the device's ACL


def mosquitto_limits(max_packet_bytes: int) -> list[str]:
    """Mosquitto's configuration lines for the same limit: `max_packet_size` counts the whole packet
    (the fixed header's at most 5 bytes too) and disconnects on the header, before the body is read;
    `message_size_limit` bounds a PUBLISH's payload."""
    return [f"max_packet_size {max_packet_bytes + 5}", f"message_size_limit {max_packet_bytes}"]


class PacketSizeGate(ReaderAdapter):
    """Reads through to a connection, following the MQTT framing of what passes: raises
    `OversizedPacket` when a fixed header's remaining length is over `limit`, before returning the
    header's last byte (so the body is never asked for). `on_oversize(length)` is called first."""

    def __init__(self, inner: ReaderAdapter, limit: int, on_oversize: Callable[[int], None]) -> None:
        self.inner = inner
        self.limit = limit
        self._on_oversize = on_oversize
        self._body_left = 0  # bytes of the current packet's body still to pass
        self._in_length = False  # reading the remaining-length varint
        self._length = 0
        self._length_bytes = 0

    async def read(self, n: int = -1) -> bytes:
        data = await self.inner.read(n)
        self._follow(data)
        return data

    def feed_eof(self) -> None:
        self.inner.feed_eof()

    def _follow(self, data: bytes) -> None:
        i, end = 0, len(data)
        while i < end:
            if self._body_left:
                step = min(self._body_left, end - i)
                self._body_left -= step
                i += step
            elif not self._in_length:  # the packet type byte
                self._in_length, self._length, self._length_bytes = True, 0, 0
                i += 1
            else:
                byte = data[i]
                self._length += (byte & 0x7F) << (7 * self._length_bytes)
                self._length_bytes += 1
                i += 1
                if byte & 0x80:
                    if self._length_bytes >= _MAX_LENGTH_BYTES:
                        self._refuse(self._length, "a malformed remaining length")
                    continue
                self._in_length = False
                if self._length > self.limit:
                    self._refuse(self._length, f"a packet of {self._length} bytes (at most {self.limit})")
                self._body_left = self._length

    def _refuse(self, length: int, what: str) -> None:
        self._on_oversize(length)
        raise OversizedPacket(f"{what} announced")

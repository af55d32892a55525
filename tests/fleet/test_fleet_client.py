"""FleetClient against a real socket whose first connection is reset after the request arrives (a
kept-alive connection the fleet closed as the request went out): a GET goes once more, anything
else fails with a clear error and is not sent twice."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from slmops_fleet.client import FleetClient, FleetClientError


class ResetOnce:
    """Accepts connections; resets the first one once it has the request, answers the others."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                line = conn.recv(65536).split(b"\r\n", 1)[0].decode()
                self.requests.append(line)
                if len(self.requests) == 1:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
                    continue
                body = b'{"ok": true}'
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server() -> Iterator[ResetOnce]:
    s = ResetOnce()
    yield s
    s.close()


def test_a_get_on_a_reset_connection_goes_once_more(server: ResetOnce) -> None:
    with FleetClient(server.url, "token") as client:
        assert client.request("GET", "/v1/stats") == {"ok": True}
    assert server.requests == ["GET /v1/stats HTTP/1.1"] * 2


def test_a_post_on_a_reset_connection_is_not_sent_twice(server: ResetOnce) -> None:
    with FleetClient(server.url, "token") as client, pytest.raises(FleetClientError, match="talking to the fleet"):
        client.request("POST", "/v1/rollouts", json={})
    assert server.requests == ["POST /v1/rollouts HTTP/1.1"]

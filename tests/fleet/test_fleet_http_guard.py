"""The HTTP API's gate (`http_guard`): the admin token and a body's size are checked before the body
is read, so an oversized body costs the fleet next to nothing and /healthz keeps answering meanwhile.
Real requests over a real socket to a running fleet; the fleet runs in this process, so its resident
memory is this process's."""

from __future__ import annotations

import select
import socket
from typing import Any

import httpx
import pytest

from slmops_fleet.http_guard import MAX_JSON_BYTES
from slmops_testing.attacks import Watch

HUGE = 200 * (1 << 20)
PIECE = b"[" + b"1," * (1 << 15)  # 64 KiB of a JSON array that never ends


def send_oversized(url: str, path: str, *, headers: dict[str, str], chunked: bool) -> tuple[int | None, int]:
    """POST a 200 MiB body, stopping as soon as the fleet answers (or stops reading); return the status
    code it answered (None: no answer) and the bytes of body sent."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    sock = socket.create_connection((host, port), timeout=2)
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {HUGE}")
    sent = 0
    try:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        while sent < HUGE and not select.select([sock], [], [], 0)[0]:
            frame = f"{len(PIECE):x}\r\n".encode() + PIECE + b"\r\n" if chunked else PIECE
            sock.sendall(frame)
            sent += len(PIECE)
    except (TimeoutError, BrokenPipeError, ConnectionResetError):
        pass  # the fleet stopped reading or closed: its answer is already on the way
    try:
        sock.settimeout(10)
        answer = sock.recv(4096)
    except (TimeoutError, ConnectionResetError):
        answer = b""
    finally:
        sock.close()
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
    return status, sent


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_anonymous_oversized_body_is_refused_before_it_is_read(fleet: Any, chunked: bool) -> None:
    with Watch(fleet.url) as watch:
        status, sent = send_oversized(fleet.url, "/v1/rollouts", headers={}, chunked=chunked)
    assert status == 401
    assert sent < 32 * (1 << 20), f"the fleet read {sent} bytes of an anonymous body"
    assert watch.rss_peak - watch.rss_before < 8 * (1 << 20), (watch.rss_before, watch.rss_peak)
    assert watch.statuses == {200} and max(watch.latencies) < 1.0, watch.latencies


@pytest.mark.parametrize("path", ["/v1/rollouts", "/v1/tokens", "/v1/enroll"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_oversized_body_is_refused_at_its_limit(fleet: Any, path: str, chunked: bool) -> None:
    """With the admin token (and on /v1/enroll, open to anyone), a body past MAX_JSON_BYTES is answered
    413: at once when Content-Length says so, after the limit when the body comes in chunks."""
    headers = {"Authorization": f"Bearer {fleet.admin_token}"}
    with Watch(fleet.url) as watch:
        status, sent = send_oversized(fleet.url, path, headers=headers, chunked=chunked)
    assert status == 413
    assert sent < 32 * (1 << 20), f"the fleet read {sent} bytes past a {MAX_JSON_BYTES}-byte limit"
    assert watch.rss_peak - watch.rss_before < 8 * (1 << 20), (watch.rss_before, watch.rss_peak)
    assert watch.statuses == {200} and max(watch.latencies) < 1.0, watch.latencies
    # the fleet serves on
    with httpx.Client(base_url=fleet.url, headers=headers) as admin:
        assert admin.post("/v1/tokens", json={}).status_code == 200


def test_a_body_at_the_limit_is_read_and_judged_by_the_route(fleet: Any) -> None:
    headers = {"Authorization": f"Bearer {fleet.admin_token}", "Content-Type": "application/json"}
    body = b'{"ttl_s": 60' + b" " * (MAX_JSON_BYTES - 13) + b"}"
    assert len(body) == MAX_JSON_BYTES
    r = httpx.post(fleet.url + "/v1/tokens", content=body, headers=headers)
    assert r.status_code == 200, r.text
    r = httpx.post(fleet.url + "/v1/tokens", content=body + b" ", headers=headers)
    assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_unknown_admin_paths_need_the_token_too(fleet: Any) -> None:
    r = httpx.get(fleet.url + "/v1/no-such-thing")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    r = httpx.get(fleet.url + "/v1/no-such-thing", headers={"Authorization": f"Bearer {fleet.admin_token}"})
    assert r.status_code == 404

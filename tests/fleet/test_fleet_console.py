"""The web console over plain HTTP on a running fleet (FleetThread, embedded broker, simulated devices
sending telemetry over MQTT): signing in, what the session cookie may and may not do, hostile
sign-ins, the telemetry reads its plots use, and the lineage a release page shows. The browser's
view is in test_fleet_console_browser.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from slmops_fleet.admin_auth import AdminAuth
from slmops_fleet.console.sessions import COOKIE, ConsoleSessions
from slmops_fleet.store import Store
from slmops_fleet.store.records import TelemetryRecord
from slmops_testing.console_fleet import ConsoleFleet

PAGES = [
    "/ui/devices",
    "/ui/devices/x",
    "/ui/groups",
    "/ui/rollouts",
    "/ui/rollouts/x",
    "/ui/releases",
    "/ui/releases/x",
    "/ui/fleet",
]


@contextmanager
def _sign_in(base: str, token: str) -> Iterator[tuple[httpx.Client, httpx.Response]]:
    """A client that posted the sign-in form with `token`, and the answer."""
    with httpx.Client(base_url=base, timeout=30) as client:
        yield client, client.post("/ui/login", data={"token": token})


def test_sign_in_gives_a_read_only_session(console_fleet: ConsoleFleet) -> None:
    base = console_fleet.thread.url
    for token in (console_fleet.read_only_token(), console_fleet.thread.admin_token):
        with _sign_in(base, token) as (client, r):
            assert r.status_code == 303 and r.headers["location"] == "/ui/devices"
            cookie = r.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
            assert token not in cookie and token not in r.text
            session = client.cookies[COOKIE]
            assert len(session) >= 40
            for path in PAGES:
                page = client.get(path)
                assert page.status_code == 200, path
                assert token not in page.text and session not in page.text
                assert "script-src 'self'" in page.headers["content-security-policy"]
            reads = ("/v1/devices", "/v1/groups", "/v1/rollouts", "/v1/releases", "/v1/status", "/v1/telemetry/latest")
            for path in reads:
                assert client.get(path).status_code == 200, path
            # the cookie never writes, even the owner's: no token made, no tag set (and no CSRF)
            tokens_before = len(console_fleet.admin.get("/v1/admin-tokens").json()["tokens"])
            dev = console_fleet.devices[1].device_id
            assert client.post("/v1/tokens", json={}).status_code == 401
            assert client.post(f"/v1/devices/{dev}/tags", json={"add": ["evil"]}).status_code == 401
            assert client.post("/v1/admin-tokens", json={"name": "evil", "role": "admin"}).status_code == 401
            assert len(console_fleet.admin.get("/v1/admin-tokens").json()["tokens"]) == tokens_before
            assert "evil" not in console_fleet.admin.get(f"/v1/devices/{dev}").json()["tags"]
            # a wrong bearer token is not rescued by a good cookie
            assert client.get("/v1/devices", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_read_only_session_keeps_its_role(console_fleet: ConsoleFleet) -> None:
    with _sign_in(console_fleet.thread.url, console_fleet.read_only_token()) as (client, r):
        assert r.status_code == 303
        assert client.get("/v1/admin-tokens").status_code == 403  # admin only, as with the bearer token


def test_wrong_tokens_are_refused(console_fleet: ConsoleFleet) -> None:
    base = console_fleet.thread.url
    good = console_fleet.read_only_token()
    for wrong in ("nope", good[:-1], good + "x", f"{good} {good}", "x" * 600, ""):
        with _sign_in(base, wrong) as (client, r):
            assert r.status_code == 401, wrong
            assert "Wrong, revoked or malformed token" in r.text
            assert "set-cookie" not in r.headers
            assert (wrong not in r.text) if wrong else True
            assert client.get("/ui/devices").status_code == 303
    with httpx.Client(base_url=base, timeout=30) as client:
        # two token fields, a JSON body, a body over the guard's cap
        assert client.post("/ui/login", content=f"token={good}&token={good}", headers={
            "content-type": "application/x-www-form-urlencoded"}).status_code == 401  # fmt: skip
        assert client.post("/ui/login", json={"token": good}).status_code == 400
        assert client.post("/ui/login", data={"token": "x" * (2 << 20)}).status_code == 413
        assert COOKIE not in client.cookies


def test_pages_need_a_session(console_fleet: ConsoleFleet) -> None:
    base = console_fleet.thread.url
    with httpx.Client(base_url=base, timeout=30, cookies={COOKIE: "forged-session-id"}) as client:
        for path in PAGES:
            r = client.get(path)
            assert r.status_code == 303 and r.headers["location"] == "/ui/login", path
        assert client.get("/v1/devices").status_code == 401
        login = client.get("/ui/login")
        assert login.status_code == 200 and 'name="token"' in login.text
        assert client.get("/ui/static/uPlot.iife.min.js").status_code == 200  # public assets


def test_session_ends_with_sign_out_and_with_its_token(console_fleet: ConsoleFleet) -> None:
    base = console_fleet.thread.url
    with _sign_in(base, console_fleet.read_only_token("leaving")) as (client, r):
        assert r.status_code == 303
        session = client.cookies[COOKIE]
        assert client.post("/ui/logout").status_code == 303
        with httpx.Client(base_url=base, cookies={COOKIE: session}) as replay:
            assert replay.get("/v1/devices").status_code == 401
            assert replay.get("/ui/devices").status_code == 303
    with _sign_in(base, console_fleet.read_only_token("revoked")) as (client, r):
        assert r.status_code == 303
        assert client.get("/v1/devices").status_code == 200
        assert console_fleet.admin.post("/v1/admin-tokens/revoked/revoke").status_code == 200
        assert client.get("/v1/devices").status_code == 401  # the token's revocation ends its session
        assert client.get("/ui/devices").status_code == 303


def test_sessions_expire_and_are_bounded(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/fleet.db")
    store.migrate()
    try:
        sessions = ConsoleSessions(AdminAuth("owner-token", store), ttl_s=0.2, max_sessions=2)
        assert sessions.sign_in("wrong") is None
        first = sessions.sign_in("owner-token")
        assert first is not None and first[1].name == "owner"
        assert sessions.principal(first[0]) == first[1]
        time.sleep(0.3)
        assert sessions.principal(first[0]) is None
        ids = [found[0] for found in (sessions.sign_in(" owner-token ") for _ in range(3)) if found]
        assert [sessions.principal(i) is not None for i in ids] == [False, True, True]  # the oldest dropped
    finally:
        store.close()


def test_telemetry_series_and_latest(console_fleet: ConsoleFleet) -> None:
    admin = console_fleet.admin
    dev = console_fleet.devices[0].device_id
    deadline = time.monotonic() + 15
    while len(admin.get("/v1/telemetry/latest").json()["devices"]) < 3:  # ingest batches and flushes
        assert time.monotonic() < deadline, "telemetry did not arrive"
        time.sleep(0.1)
    body = admin.get("/v1/telemetry/series", params={"device_id": dev, "since_s": 900, "points": 180}).json()
    assert body["bucket_ms"] == 5000
    points = body["points"]
    assert len(points) == 12  # one sample every 5 s, one per bucket
    assert [p["requests_total"] for p in points] == [10 * (i + 1) for i in range(12)]
    assert all(100 <= p["tokens_per_s"] <= 140 and p["devices"] == 1 for p in points)
    # Buckets are aligned to the clock, so the minute of samples may fall in one 120 s bucket or two.
    fleet_wide = admin.get("/v1/telemetry/series", params={"since_s": 120, "points": 1}).json()
    assert fleet_wide["bucket_ms"] == 120_000 and 1 <= len(fleet_wide["points"]) <= 2
    assert sum(p["samples"] for p in fleet_wide["points"]) == 36
    assert max(p["devices"] for p in fleet_wide["points"]) == 3
    latest = admin.get("/v1/telemetry/latest").json()["devices"][dev]
    assert latest["memory_total_bytes"] == 4 << 30 and latest["tokens_per_s"] > 0
    assert admin.get("/v1/telemetry/series", params={"device_id": "dev-nope"}).status_code == 404
    for bad in ({"points": 0}, {"since_s": -1}, {"points": 10**6}, {"device_id": "x" * 100}):
        assert admin.get("/v1/telemetry/series", params=bad).status_code == 422, bad


@pytest.mark.parametrize("path", ["/v1/releases/{id}", "/v1/packages/{package}"])
def test_release_shows_lineage_and_quality(console_fleet: ConsoleFleet, path: str) -> None:
    url = path.format(id=console_fleet.release["id"], package=console_fleet.package["package_id"])
    body = console_fleet.admin.get(url).json()
    package = body["packages"][0] if "packages" in body else body
    assert package["lineage"]["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert package["lineage"]["dataset_sha256"] == ["d1" * 32]
    assert package["evaluation"]["metrics"]["perplexity"] == 12.5


def test_sign_ins_are_audited_and_other_sites_refused(console_fleet: ConsoleFleet) -> None:
    base = console_fleet.thread.url
    token = console_fleet.read_only_token("auditee")
    with httpx.Client(base_url=base, timeout=30) as client:
        r = client.post("/ui/login", data={"token": token}, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403 and COOKIE not in client.cookies  # a sign-in another site posted
        assert client.post("/ui/login", data={"token": token}, headers={"Origin": base}).status_code == 303
        assert client.post("/ui/login", data={"token": "wrong"}).status_code == 401
    entries = [e for e in console_fleet.admin.get("/v1/audit").json()["entries"] if e["path"] == "/ui/login"]
    assert [(e["actor"], e["role"], e["status"]) for e in entries] == [
        ("auditee", "read-only", 303),
        ("unknown", "", 401),
    ]


def test_telemetry_buckets_on_both_databases(store: Store) -> None:
    """The series and latest reads the plots and the table use, on SQLite and PostgreSQL."""
    a, b = (
        store.enroll(store.create_token(60)[0], public_key="ab" * 32, name=n, inventory={}, mqtt_password_hash="h").id
        for n in ("a", "b")
    )
    samples = [
        TelemetryRecord(
            d,
            seq=i,
            timestamp_ms=10_000 + 1000 * i,
            tokens_per_s=float(i),
            requests_total=i,
            memory_used_bytes=100 * i,
            memory_total_bytes=4000,
        )
        for d in (a, b)
        for i in range(10)
    ]
    store.insert_telemetry(samples, {})
    one = store.telemetry_series(a, since_ms=12_000, bucket_ms=4000)  # samples 2..9 in buckets 12k, 16k
    assert [p["t"] for p in one] == [12_000, 16_000]
    assert [p["samples"] for p in one] == [4, 4] and [p["devices"] for p in one] == [1, 1]
    assert [p["tokens_per_s"] for p in one] == [3.5, 7.5] and [p["requests_total"] for p in one] == [5, 9]
    fleet = store.telemetry_series(None, since_ms=0, bucket_ms=100_000)
    assert len(fleet) == 1 and fleet[0]["samples"] == 20 and fleet[0]["devices"] == 2
    latest = store.telemetry_latest(since_ms=15_000)
    assert set(latest) == {a, b}
    assert latest[a] == {
        "tokens_per_s": 7.0,
        "memory_used_bytes": 900,
        "memory_total_bytes": 4000,
        "timestamp_ms": 19_000,
    }
    assert store.telemetry_latest(since_ms=20_000) == {}

"""Admin tokens with roles and the audit log, through a running fleet (both brokers for the API, the
store on SQLite and PostgreSQL), and the CLI against a served fleet."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops_cli.procs import ProcessFailed, run, run_json
from slmops_fleet.errors import Conflict, InvalidRequest
from slmops_fleet.store import Store
from slmops_fleet.store.database import utcnow
from slmops_testing.fleet_api import enroll, new_token, upload
from slmops_testing.packages import random_bytes

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}


def bearer(fleet: Any, token: str) -> httpx.Client:
    return httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def snapshot(owner: httpx.Client, device_id: str) -> dict[str, Any]:
    """Everything an admin call could change."""
    paths = ["/v1/devices", "/v1/packages", "/v1/releases", "/v1/rollouts", "/v1/admin-tokens"]
    paths.append(f"/v1/devices/{device_id}/telemetry")
    return {p: owner.get(p).json() for p in paths}


def mutating_routes(client: httpx.Client) -> list[tuple[str, str]]:
    """(method, path template) of every route that may change something, from the fleet's OpenAPI."""
    paths = client.get("/openapi.json").json()["paths"]
    return [
        (method.upper(), path)
        for path, ops in sorted(paths.items())
        for method in sorted(ops)
        if method.upper() in MUTATING and path != "/v1/enroll"
    ]


def test_a_read_only_token_changes_nothing(
    any_fleet: Any, owner: httpx.Client, fleet_package: Callable[..., Path]
) -> None:
    ro = owner.post("/v1/admin-tokens", json={"name": "auditor", "role": "read-only"}).json()
    device_id = enroll(any_fleet, new_token(owner)).json()["device_id"]
    pkg = upload(owner, fleet_package({"m.bin": random_bytes(3000, 3)}))
    rollout = owner.post("/v1/rollouts", json={"package_id": pkg["package_id"], "target": "all"}).json()
    values = {
        "device_id": device_id,
        "rollout_id": rollout["id"],
        "action": "cancel",
        "sha256": pkg["files"][0]["sha256"] if pkg.get("files") else "0" * 64,
        "name": "auditor",
        "ref": pkg["package_id"],
    }
    before = snapshot(owner, device_id)
    routes = mutating_routes(owner)
    # the routes of this issue are among them, and every one is refused before its body is read
    assert {("POST", "/v1/devices/{device_id}/revoke"), ("POST", "/v1/admin-tokens")} <= set(routes)
    assert len(routes) >= 10
    with bearer(any_fleet, ro["token"]) as client:
        for method, template in routes:
            path = template.format(**values)
            r = client.request(method, path, content=b'{"name": "x", "role": "admin"}')
            assert r.status_code == 403, (method, path, r.text)
            assert "read-only token 'auditor' may not" in r.json()["detail"]
        # the role is checked before the body is read: an oversized body gets 403, not 413
        r = client.post("/v1/rollouts", content=b"x" * (5 << 20), headers={"Content-Type": "application/json"})
        assert r.status_code == 403, r.text
        # reading works, except the admin tokens
        assert client.get("/v1/devices").status_code == 200
        assert client.get(f"/v1/devices/{device_id}").json()["status"] == "active"
        assert client.get("/v1/audit").status_code == 200
        assert client.get("/v1/admin-tokens").status_code == 403
    assert snapshot(owner, device_id) == before
    refused = [e for e in owner.get("/v1/audit").json()["entries"] if e["actor"] == "auditor"]
    assert len(refused) == len(routes) + 2 and {e["status"] for e in refused} == {
        403
    }  # + the big body and the token list
    assert {e["role"] for e in refused} == {"read-only"} and all(e["client"] == "127.0.0.1" for e in refused)


def test_operator_tokens_and_revocation_and_the_audit_log(any_fleet: Any, owner: httpx.Client) -> None:
    op = owner.post("/v1/admin-tokens", json={"name": "ci", "role": "operator"})
    assert op.status_code == 200 and op.json()["token"].startswith("slm_"), op.text
    assert owner.post("/v1/admin-tokens", json={"name": "ci", "role": "admin"}).status_code == 409
    assert owner.post("/v1/admin-tokens", json={"name": "x", "role": "root"}).status_code == 400
    assert owner.post("/v1/admin-tokens", json={"name": "owner", "role": "admin"}).status_code == 400
    with bearer(any_fleet, op.json()["token"]) as ci:
        token = ci.post("/v1/tokens", json={}).json()["token"]  # an operator runs the fleet
        device_id = enroll(any_fleet, token).json()["device_id"]
        assert ci.post(f"/v1/devices/{device_id}/tags", json={"add": ["canary"]}).status_code == 200
        r = ci.post("/v1/admin-tokens", json={"name": "mine", "role": "admin"})  # but makes no tokens
        assert r.status_code == 403 and "needs admin" in r.json()["detail"]
        assert ci.post(f"/v1/devices/{device_id}/revoke").json()["revoked_by"] == "ci"
        listed = {t["name"]: t for t in owner.get("/v1/admin-tokens").json()["tokens"]}
        assert listed["ci"]["role"] == "operator" and "token" not in listed["ci"]
        assert owner.post("/v1/admin-tokens/ci/revoke").json()["revoked_now"] is True
        assert ci.get("/v1/devices").status_code == 401  # revoked: refused from the next request on
    assert owner.post("/v1/admin-tokens/ci/revoke").json()["revoked_now"] is False
    assert owner.post("/v1/admin-tokens/nobody/revoke").status_code == 404

    entries = owner.get("/v1/audit").json()["entries"]
    seen = [(e["actor"], e["method"], e["path"], e["target"], e["status"]) for e in entries]
    assert ("owner", "POST", "/v1/admin-tokens", "ci", 200) in seen
    assert ("owner", "POST", "/v1/admin-tokens", "ci", 409) in seen
    assert ("ci", "POST", "/v1/tokens", "", 200) in seen
    assert ("enrollment", "POST", "/v1/enroll", device_id, 200) in seen
    assert ("ci", "POST", f"/v1/devices/{device_id}/revoke", device_id, 200) in seen
    assert ("ci", "POST", "/v1/admin-tokens", "", 403) in seen  # refused unread: no target
    assert ("owner", "POST", "/v1/admin-tokens/ci/revoke", "ci", 200) in seen
    assert not [e for e in entries if e["method"] == "GET"]  # reading is not an action
    # --since
    later = (utcnow() + timedelta(seconds=60)).isoformat()
    assert owner.get("/v1/audit", params={"since": later}).json()["entries"] == []
    assert owner.get("/v1/audit", params={"since": "2020-01-01T00:00:00"}).status_code == 400


def test_admin_tokens_and_audit_in_the_store(store: Store) -> None:
    token, rec = store.create_admin_token("ro-1", "read-only", created_by="owner")
    assert store.admin_token_for(token) == rec and store.admin_token_for(token + "x") is None
    with pytest.raises(Conflict):
        store.create_admin_token("ro-1", "operator", created_by="owner")
    with pytest.raises(InvalidRequest):
        store.create_admin_token("bad name", "operator", created_by="owner")
    assert store.revoke_admin_token("ro-1")[1] is True
    assert store.admin_token_for(token) is None and store.revoke_admin_token(rec.id)[1] is False
    for i in range(5):
        store.add_audit(actor="a", role="operator", client="c", method="POST", path=f"/p/{i}", target="", status=200)
    newest = store.list_audit(limit=2)
    assert [e.path for e in newest] == ["/p/3", "/p/4"]
    assert store.list_audit(since=utcnow() + timedelta(seconds=5)) == []


def test_cli_admin_tokens_and_audit(fleet: Any) -> None:
    args = ["--fleet", fleet.url, "--token", fleet.admin_token]
    made = run_json(["fleet", "admin-token", "create", "viewer", "--role", "read-only", "--json", *args])
    assert made["role"] == "read-only" and made["token"]
    listed = run_json(["fleet", "admin-token", "list", "--json", *args])
    assert [t["name"] for t in listed] == ["viewer"] and "token" not in listed[0]
    ro = ["--fleet", fleet.url, "--token", made["token"]]
    assert run_json(["fleet", "device", "list", "--json", *ro]) == []
    with pytest.raises(ProcessFailed, match="read-only token 'viewer' may not POST"):
        run(["fleet", "token", "create", *ro])
    assert run_json(["fleet", "admin-token", "revoke", "viewer", "--json", *args])["revoked_now"] is True
    with pytest.raises(ProcessFailed, match="refused the admin token"):
        run(["fleet", "device", "list", *ro])
    audit = run_json(["fleet", "audit", "--since", "10m", "--json", *args])
    assert [(e["actor"], e["path"], e["status"]) for e in audit] == [
        ("owner", "/v1/admin-tokens", 200),
        ("viewer", "/v1/tokens", 403),
        ("owner", "/v1/admin-tokens/viewer/revoke", 200),
    ]
    table = run(["fleet", "audit", *args])
    assert "viewer" in table and "403" in table
    assert json.loads(run(["fleet", "audit", "--since", "2099-01-01T00:00:00Z", "--json", *args])) == []

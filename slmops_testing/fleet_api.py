"""Admin calls on a running fleet's HTTP API (a FleetThread: `.url`, `.admin_token`) for tests:
tokens, enrollment with a typical inventory, package uploads, and two devices with a rollout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

PUB = "ab" * 32
INVENTORY = {
    "os": "Linux",
    "arch": "x86_64",
    "cpu_count": 2,
    "memory_bytes": 8 << 30,
    "disk_free_bytes": 20 << 30,
    "providers": ["CPUExecutionProvider"],
    "cpu_features": ["avx2"],
    "agent_version": "0.1.0",
}


def new_token(admin: httpx.Client, ttl_s: int | None = None) -> str:
    r = admin.post("/v1/tokens", json={"ttl_s": ttl_s} if ttl_s else {})
    assert r.status_code == 200, r.text
    return str(r.json()["token"])


def enroll(fleet: Any, token: str, name: str = "edge-1") -> httpx.Response:
    return httpx.post(
        fleet.url + "/v1/enroll", json={"token": token, "public_key": PUB, "name": name, "inventory": INVENTORY}
    )


def device_count(admin: httpx.Client) -> int:
    return len(admin.get("/v1/devices").json()["devices"])


def upload(admin: httpx.Client, folder: Path, blobs: bool = True) -> dict[str, Any]:
    r = admin.post("/v1/packages", content=(folder / "manifest.signed.pb").read_bytes())
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    if blobs:
        for sha in body["missing_blobs"]:
            assert admin.put(f"/v1/blobs/{sha}", content=(folder / "blobs" / sha).read_bytes()).status_code == 200
    return body


def enroll_two_and_roll_out(fleet: Any, folder: Path, **rollout: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Enroll devices "a" and "b" on a running fleet (a FleetThread) and roll the package `folder` out
    to both (`rollout`: more fields of the rollout request, e.g. gates); returns their enrollment
    responses, for `check_device_isolation`."""
    with httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {fleet.admin_token}"}) as admin:
        creds = []
        for name in ("a", "b"):
            token = new_token(admin)
            r = httpx.post(fleet.url + "/v1/enroll", json={"token": token, "public_key": "cd" * 32, "name": name})
            assert r.status_code == 200, r.text
            creds.append(r.json())
        body = upload(admin, folder)
        r = admin.post("/v1/rollouts", json={"package_id": body["package_id"], "target": "all", **rollout})
        assert r.status_code == 200, r.text
    return creds[0], creds[1]


def enroll_one_and_roll_out(fleet: Any, folder: Path) -> tuple[str, dict[str, Any]]:
    """Upload the package `folder` to a running fleet (a FleetThread), enroll one device and roll the
    package out to all; returns the package id and the device's enrollment response."""
    with httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {fleet.admin_token}"}) as admin:
        pid = str(upload(admin, folder)["package_id"])
        r = httpx.post(fleet.url + "/v1/enroll", json={"token": new_token(admin), "public_key": "ef" * 32})
        assert r.status_code == 200, r.text
        assert admin.post("/v1/rollouts", json={"package_id": pid}).status_code == 200
    return pid, r.json()

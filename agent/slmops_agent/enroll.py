"""`slmops agent enroll`: register this device with a fleet and keep its credentials."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops_agent.credentials import (
    Credentials,
    CredentialsError,
    MqttCredentials,
    load_or_create_device_key,
    public_key_hex,
    save_device_key,
)
from slmops_agent.errors import EnrollError
from slmops_agent.inventory import Inventory, collect_inventory
from slmops_agent.layout import StateLayout


def enroll(
    fleet_url: str,
    token: str,
    state_dir: Path,
    *,
    name: str = "",
    force: bool = False,
    inventory: Inventory | None = None,
    timeout_s: float = 15.0,
) -> Credentials:
    """POST /v1/enroll and store credentials.json; raise EnrollError with a one-line message."""
    if not fleet_url.startswith(("http://", "https://")):
        raise EnrollError(f"fleet URL must start with http:// or https://, got {fleet_url!r}")
    if not token.strip():
        raise EnrollError("the enrollment token is empty")
    layout = StateLayout(state_dir)
    if layout.credentials.exists() and not force:
        try:
            existing = Credentials.load(layout.credentials)
            who = f"as {existing.device_id} with {existing.fleet_url}"
        except CredentialsError:
            who = "(unreadable credentials.json)"
        raise EnrollError(f"this device is already enrolled {who}; use --force to enroll again")
    layout.create()
    # with --force a new key is made, but kept in memory until the fleet has accepted it: a refused
    # re-enrollment leaves the device as it was
    key = Ed25519PrivateKey.generate() if force else load_or_create_device_key(layout.device_key)
    inv = inventory or collect_inventory(state_dir)
    body: dict[str, Any] = {
        "token": token.strip(),
        "public_key": public_key_hex(key),
        "name": name,
        "inventory": inv.to_json(),
    }
    url = fleet_url.rstrip("/") + "/v1/enroll"
    try:
        response = httpx.post(url, json=body, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise EnrollError(f"cannot reach the fleet at {fleet_url}: {_why(exc)}") from exc
    if response.status_code != 200 and response.status_code != 201:
        raise EnrollError(_http_error(response))
    try:
        data = response.json()
        mqtt = data["mqtt"]
        creds = Credentials(
            device_id=str(data["device_id"]),
            fleet_url=str(data.get("fleet_url") or fleet_url),
            mqtt=MqttCredentials(
                host=str(mqtt["host"]),
                port=int(mqtt["port"]),
                username=str(mqtt["username"]),
                password=str(mqtt["password"]),
                topic_root=str(mqtt.get("topic_root") or "slmops/v1"),
                tls=bool(mqtt.get("tls", False)),
            ),
            signing_keys=[str(k) for k in data.get("signing_keys", [])],
            key_sequence=int(data.get("key_sequence", 0)),
            name=name,
            enrolled_unix_ms=int(time.time() * 1000),
        )
        creds.trusted_keys()  # every pinned key must parse
    except (ValueError, KeyError, TypeError) as exc:
        raise EnrollError(f"the fleet answered with a malformed enrollment response: {exc}") from exc
    if not creds.device_id:
        raise EnrollError("the fleet answered without a device id")
    if force:
        save_device_key(layout.device_key, key)
    creds.save(layout.credentials)
    layout.key_ring.unlink(missing_ok=True)  # the keys just pinned are the truth now
    return creds


def _why(exc: httpx.HTTPError) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0]


def _http_error(response: httpx.Response) -> str:
    detail: Any = None
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):  # FastAPI's 422 body: a list of problems
        detail = "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg', '')}" if isinstance(d, dict) else str(d)
            for d in detail
        )
    detail = str(detail) if detail else (response.text.strip().splitlines() or [""])[0][:200]
    if response.status_code == 401:
        return f"enrollment refused: {detail}"
    if response.status_code == 422:
        return f"the fleet rejected the enrollment request: {detail}"
    return f"enrollment failed: HTTP {response.status_code} {detail}".rstrip()

"""`slmops agent enroll`: register this device with a fleet and keep its credentials.

httpx is imported when a call is made: importing it imports its own CLI's libraries (click, rich)
where they are installed."""

from __future__ import annotations

import hmac
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

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
from slmops_protos.links import FINGERPRINT_PREFIX, certificate_fingerprint, is_loopback
from slmops_protos.manifests import public_key_from_hex

if TYPE_CHECKING:
    import httpx


def enroll(
    fleet_url: str,
    token: str,
    state_dir: Path,
    *,
    name: str = "",
    force: bool = False,
    inventory: Inventory | None = None,
    ca_file: Path | None = None,
    ca_fingerprint: str | None = None,
    trust_keys: list[str] | None = None,
    timeout_s: float = 15.0,
) -> Credentials:
    """POST /v1/enroll and store credentials.json; raise EnrollError with a one-line message.

    `ca_file`: the fleet's CA, given out of band, that the enrollment request verifies the fleet with
    (default: the system's CAs); or `ca_fingerprint` (sha256:HEX): the fleet's public /v1/ca.pem is
    fetched and used only if its fingerprint is that one. `trust_keys`: package signing keys (hex)
    given out of band: the device pins only these, and the fleet must trust at least one of them."""
    parts = urlsplit(fleet_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EnrollError(f"fleet URL must look like https://host:port, got {fleet_url!r}")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise EnrollError(
            f"refusing plaintext http:// to {parts.hostname}, which is not loopback: use https:// "
            "(with --ca FILE, the fleet's tls/ca.pem, for its private CA)"
        )
    if ca_file is not None and ca_fingerprint:
        raise EnrollError("give the fleet's CA as --ca FILE or as --ca-fingerprint, not both")
    verify = _verify(ca_file)
    ca_pem = ca_file.read_text() if ca_file is not None else None
    if ca_fingerprint:
        ca_pem = _fetch_pinned_ca(fleet_url, ca_fingerprint, timeout_s)
        verify = ssl.create_default_context(cadata=ca_pem)
    pinned = [_key_hex(k) for k in trust_keys or []]
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
    import httpx

    try:
        response = httpx.post(url, json=body, timeout=timeout_s, verify=verify)
    except httpx.HTTPError as exc:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            by = (
                f"the CA in {ca_file}"
                if ca_file
                else f"the CA of fingerprint {ca_fingerprint}"
                if ca_fingerprint
                else "the system's CAs (pass --ca with the fleet's tls/ca.pem)"
            )
            raise EnrollError(f"the fleet at {fleet_url} is not verified by {by}: {_why(exc)}") from exc
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
                ca_pem=mqtt.get("ca_pem") or None,
            ),
            signing_keys=_signing_keys([str(k) for k in data.get("signing_keys", [])], pinned),
            fleet_ca_pem=data.get("fleet_ca_pem") or ca_pem,
            key_sequence=int(data.get("key_sequence", 0)),
            name=name,
            enrolled_unix_ms=int(time.time() * 1000),
        )
        creds.trusted_keys()  # every pinned key must parse
        Credentials.from_json(creds.to_json())  # and every CA certificate
    except (ValueError, KeyError, TypeError, CredentialsError) as exc:
        raise EnrollError(f"the fleet answered with a malformed enrollment response: {exc}") from exc
    if not creds.device_id:
        raise EnrollError("the fleet answered without a device id")
    if force:
        save_device_key(layout.device_key, key)
    creds.save(layout.credentials)
    layout.key_ring.unlink(missing_ok=True)  # the keys just pinned are the truth now
    return creds


def _verify(ca_file: Path | None) -> ssl.SSLContext | bool:
    if ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise EnrollError(f"cannot read the CA certificate {ca_file}: {exc}") from None


def _fetch_pinned_ca(fleet_url: str, fingerprint: str, timeout_s: float) -> str:
    """The fleet's CA from its public /v1/ca.pem, read without verification and kept only if its
    fingerprint is the one the operator gave (so a stranger on the path cannot substitute one)."""
    want = fingerprint.strip().lower()
    if not want.startswith(FINGERPRINT_PREFIX):
        want = FINGERPRINT_PREFIX + want.replace(":", "")
    import httpx

    try:
        response = httpx.get(fleet_url.rstrip("/") + "/v1/ca.pem", timeout=timeout_s, verify=False)
    except httpx.HTTPError as exc:
        raise EnrollError(f"cannot reach the fleet at {fleet_url}: {_why(exc)}") from exc
    if response.status_code != 200:
        raise EnrollError(f"the fleet at {fleet_url} offers no CA certificate (HTTP {response.status_code})")
    pem = response.text
    try:
        got = certificate_fingerprint(pem)
    except ValueError:
        raise EnrollError(f"the fleet at {fleet_url} answered /v1/ca.pem with no certificate") from None
    if not hmac.compare_digest(got, want):
        raise EnrollError(f"the fleet's CA has fingerprint {got}, not the {want} given: refusing to enroll")
    return pem


def _key_hex(key: str) -> str:
    """A signing key given out of band (hex, or a *.pub file of hex) as lowercase hex."""
    text = Path(key).read_text().strip() if Path(key).is_file() else key.strip()
    try:
        public_key_from_hex(text)
    except ValueError:
        raise EnrollError(f"--trust-key {key}: not a hex Ed25519 public key (or a *.pub file of one)") from None
    return text.lower()


def _signing_keys(offered: list[str], pinned: list[str]) -> list[str]:
    """The keys the device pins: the fleet's, or only those given out of band, one of which the
    fleet must trust (else its packages could never install)."""
    if not pinned:
        return offered
    if not set(pinned) & {k.lower() for k in offered}:
        raise EnrollError("the fleet trusts none of the signing keys given with --trust-key")
    return pinned


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

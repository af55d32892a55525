"""The device's identity: its Ed25519 key and what the fleet gave it at enrollment, and
`CredentialKeeper`, which carries its broker password through a rotation."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmops_agent.errors import AgentError
from slmops_agent.layout import write_atomic
from slmops_protos.links import certificate_fingerprint

if TYPE_CHECKING:  # cryptography is imported when a key is loaded or made
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger(__name__)

CREDENTIALS_VERSION = 1
MAX_PASSWORD_CHARS = 200


class CredentialsError(AgentError):
    """credentials.json is missing or unreadable."""


@dataclass(frozen=True)
class MqttCredentials:
    host: str
    port: int
    username: str
    password: str
    topic_root: str = "slmops/v1"
    tls: bool = False
    # During a credential rotation: the password the device last connected with, kept until the new
    # one (`password`) has worked once ("" otherwise).
    previous_password: str = ""
    ca_pem: str | None = None  # the CA the broker is verified with (None with TLS: the system's CAs)


@dataclass(frozen=True)
class Credentials:
    device_id: str
    fleet_url: str
    mqtt: MqttCredentials
    signing_keys: list[str] = field(default_factory=list)  # hex of raw Ed25519 keys, pinned at enrollment
    key_sequence: int = 0  # the fleet's last key statement when it gave `signing_keys`
    fleet_ca_pem: str | None = None  # the CA the fleet's HTTPS is verified with, given at enrollment
    name: str = ""
    enrolled_unix_ms: int = 0

    def trusted_keys(self) -> list[Ed25519PublicKey]:
        from slmops_protos.manifests import public_key_from_hex

        return [public_key_from_hex(k) for k in self.signing_keys]

    def to_json(self) -> dict[str, Any]:
        return {"version": CREDENTIALS_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Credentials:
        if data.get("version") != CREDENTIALS_VERSION:
            raise CredentialsError(f"credentials format version {data.get('version')!r} is not {CREDENTIALS_VERSION}")
        m = data["mqtt"]
        return cls(
            device_id=str(data["device_id"]),
            fleet_url=str(data["fleet_url"]),
            mqtt=MqttCredentials(
                host=str(m["host"]),
                port=int(m["port"]),
                username=str(m["username"]),
                password=str(m["password"]),
                topic_root=str(m.get("topic_root") or "slmops/v1"),
                tls=bool(m.get("tls", False)),
                previous_password=str(m.get("previous_password") or ""),
                ca_pem=_optional_pem(m.get("ca_pem")),
            ),
            signing_keys=[str(k) for k in data.get("signing_keys", [])],
            key_sequence=int(data.get("key_sequence", 0)),
            fleet_ca_pem=_optional_pem(data.get("fleet_ca_pem")),
            name=str(data.get("name", "")),
            enrolled_unix_ms=int(data.get("enrolled_unix_ms", 0)),
        )

    def save(self, path: Path) -> None:
        write_atomic(path, (json.dumps(self.to_json(), indent=2) + "\n").encode(), mode=0o600)

    @classmethod
    def load(cls, path: Path) -> Credentials:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CredentialsError(
                f"not enrolled: {path} does not exist (run 'slmops agent enroll --fleet URL --token T')"
            ) from None
        except (OSError, ValueError) as exc:
            raise CredentialsError(f"cannot read {path}: {exc}") from exc
        try:
            return cls.from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise CredentialsError(f"{path} is malformed: {exc}") from exc


def _optional_pem(value: Any) -> str | None:
    """A PEM certificate as given (parsed now, so a bad one fails where it is read), or None."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("a CA certificate must be a PEM string")
    certificate_fingerprint(value)
    return value


class CredentialKeeper:
    """The device's broker password through a rotation (see `slmops_fleet.lifecycle`), saved in
    credentials.json atomically at each step. Thread-safe.

    A new password from the fleet becomes `password`; the one the device last connected with stays as
    `previous_password` until the new one has worked, because the broker switches only once the fleet
    has the device's confirmation (which may be lost to a crash on either side). A connection refused
    with one is tried with the other."""

    def __init__(self, path: Path, creds: Credentials) -> None:
        self.path = path
        self._creds = creds
        self._lock = threading.Lock()

    @property
    def creds(self) -> Credentials:
        with self._lock:
            return self._creds

    def passwords(self) -> list[str]:
        """The passwords to try, the newest first."""
        m = self.creds.mqtt
        return [m.password, m.previous_password] if m.previous_password else [m.password]

    def accept(self, device_id: str, password: str) -> bool:
        """Save a new password sent by the fleet; True when it is saved (also when it already was)."""
        with self._lock:
            m = self._creds.mqtt
            if device_id != self._creds.device_id or not password or len(password) > MAX_PASSWORD_CHARS:
                log.warning("credentials update refused: it names device %r or has no usable password", device_id)
                return False
            if password == m.password:
                return True
            keep = m.previous_password or m.password  # the one the broker still knows
            self._save(replace(m, password=password, previous_password=keep))
            log.info("new broker password saved; the old one is kept until the new one works")
            return True

    def connected_with(self, password: str) -> None:
        """A connection with `password` was accepted: once it is the newest, the old one is dropped."""
        with self._lock:
            m = self._creds.mqtt
            if m.previous_password and password == m.password:
                self._save(replace(m, previous_password=""))
                log.info("the new broker password works; the old one is forgotten")

    def _save(self, mqtt: MqttCredentials) -> None:
        creds = replace(self._creds, mqtt=mqtt)
        creds.save(self.path)
        self._creds = creds


def load_or_create_device_key(path: Path) -> Ed25519PrivateKey:
    """The device's Ed25519 key (PEM, 0600), made on first use."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise CredentialsError(f"{path} is not an Ed25519 key")
        return key
    key = Ed25519PrivateKey.generate()
    save_device_key(path, key)
    return key


def save_device_key(path: Path, key: Ed25519PrivateKey) -> None:
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, pem, mode=0o600)


def public_key_hex(key: Ed25519PrivateKey) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()

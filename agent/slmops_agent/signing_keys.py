"""The package-signing keys this device trusts, and the fleet's key statements that change them.

The ring starts from the keys pinned at enrollment (`credentials.json`, with the fleet's statement
sequence then) and those pinned for side-loading (`trusted_keys`, one hex a line). Key statements
arrive on the retained `keys` topic (`KeyStatements`, every statement the fleet applied): each one
newer than the ring's sequence must be signed by a key the ring trusts then
(`slmops_protos.key_statements`); the ring after them is written to `signing_keys.json`
atomically before the updater uses it. A bad statement (untrusted or retired signer, replay,
retiring the last key) is refused and logged, and the ring stays as it was.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, overload

from slmops_agent.credentials import Credentials
from slmops_agent.errors import AgentError
from slmops_agent.layout import StateLayout, write_atomic
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.key_statements import (
    MAX_STATEMENTS,
    KeyRing,
    KeyStatementError,
    apply_chain,
    hex_key_id,
    normalize_key,
)
from slmops_protos.manifests import public_key_from_hex

if TYPE_CHECKING:  # cryptography is imported when a key is first used
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger(__name__)


def pinned_key_hexes(layout: StateLayout, creds: Credentials | None) -> list[str]:
    """Keys pinned at enrollment plus keys added for side-loading (`trusted_keys`, one hex a line)."""
    keys = list(creds.signing_keys) if creds is not None else []
    if layout.trusted_keys.exists():
        keys += [line.strip() for line in layout.trusted_keys.read_text().splitlines() if line.strip()]
    return list(dict.fromkeys(keys))


def add_trusted_key(layout: StateLayout, key: str) -> str:
    """Pin one more signing key (hex of the raw key, or a file holding it); return its hex. A key
    retired by a key statement stays refused."""
    candidate = Path(key)
    text = candidate.read_text().strip() if candidate.is_file() else key.strip()
    try:
        text = normalize_key(text)
    except KeyStatementError as exc:
        raise AgentError(exc.reason) from exc
    if text in _read_ring_file(layout.key_ring)[1]:
        raise AgentError(f"signing key {hex_key_id(text)} was retired by a key statement; it cannot be pinned")
    path = layout.trusted_keys
    existing = path.read_text().split() if path.exists() else []
    if text not in existing:
        write_atomic(path, ("\n".join([*existing, text]) + "\n").encode(), mode=0o600)
    return text


def load_ring(layout: StateLayout, creds: Credentials | None) -> KeyRing:
    """The device's ring: the pinned keys and the ring file's, less the retired ones."""
    trusted, retired, sequence = _read_ring_file(layout.key_ring)
    try:
        return KeyRing.of(
            [*trusted, *pinned_key_hexes(layout, creds)],
            retired,
            max(sequence, creds.key_sequence if creds is not None else 0),
        )
    except KeyStatementError as exc:
        raise AgentError(f"a pinned signing key is malformed: {exc.reason}") from exc


def save_ring(layout: StateLayout, ring: KeyRing) -> None:
    data = {"version": 1, "sequence": ring.sequence, "trusted": list(ring.trusted), "retired": sorted(ring.retired)}
    write_atomic(layout.key_ring, (json.dumps(data, indent=2) + "\n").encode(), mode=0o600)


class PublicKeys(Sequence["Ed25519PublicKey"]):
    """Signing keys given as hex, checked at once, parsed when first used: an agent that verifies
    nothing (idle, no package) does not load cryptography."""

    def __init__(self, hexes: Sequence[str]) -> None:
        self.hexes = tuple(hexes)
        self._keys: list[Ed25519PublicKey] | None = None

    def _parsed(self) -> list[Ed25519PublicKey]:
        if self._keys is None:
            self._keys = [public_key_from_hex(k) for k in self.hexes]
        return self._keys

    @overload
    def __getitem__(self, index: int) -> Ed25519PublicKey: ...
    @overload
    def __getitem__(self, index: slice) -> list[Ed25519PublicKey]: ...
    def __getitem__(self, index: int | slice) -> Ed25519PublicKey | list[Ed25519PublicKey]:
        return self._parsed()[index]

    def __len__(self) -> int:
        return len(self.hexes)


def parse_keys(hexes: Sequence[str]) -> PublicKeys:
    """The keys `hexes` are the hex of; AgentError naming a malformed one."""
    try:
        return PublicKeys([normalize_key(k) for k in hexes])
    except KeyStatementError as exc:
        raise AgentError(f"a pinned signing key is malformed: {exc.reason}") from exc


def _read_ring_file(path: Path) -> tuple[list[str], list[str], int]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return [], [], 0
    except (OSError, ValueError) as exc:
        raise AgentError(f"cannot read {path}: {exc}") from exc
    try:
        return [str(k) for k in data["trusted"]], [str(k) for k in data["retired"]], int(data["sequence"])
    except (KeyError, TypeError, ValueError) as exc:
        raise AgentError(f"{path} is malformed: {exc}") from exc


class KeyTrust:
    """Applies the fleet's key statements to the device's ring; `on_change` gets each new ring
    after it is saved."""

    def __init__(
        self, layout: StateLayout, creds: Credentials | None, on_change: Callable[[KeyRing], None] | None = None
    ) -> None:
        self.layout = layout
        self.ring = load_ring(layout, creds)
        self.on_change = on_change
        self.messages = 0  # KeyStatements messages handled
        self.refused = 0  # statements refused (bad signer, retired key, malformed)
        self.last_refusal = ""
        self._lock = threading.Lock()

    def on_statements(self, msg: fleet_pb2.KeyStatements) -> None:
        """Apply the statements newer than the ring's (MQTT thread; never raises)."""
        self.messages += 1
        if len(msg.statements) > MAX_STATEMENTS:
            self._refuse(f"{len(msg.statements)} key statements in one message (limit {MAX_STATEMENTS})")
            return
        with self._lock:
            ring, applied, why = apply_chain(self.ring, [s.SerializeToString() for s in msg.statements])
            if applied:
                save_ring(self.layout, ring)
                self.ring = ring
                log.info(
                    "key statements applied up to %d: trusting %s; retired %s",
                    ring.sequence,
                    ", ".join(hex_key_id(k) for k in ring.trusted),
                    ", ".join(hex_key_id(k) for k in sorted(ring.retired)) or "none",
                )
            if why:
                self._refuse(why)
        if applied and self.on_change is not None:
            self.on_change(ring)

    def _refuse(self, why: str) -> None:
        self.refused += 1
        self.last_refusal = why
        log.warning("key statement refused: %s (still trusting the keys of statement %d)", why, self.ring.sequence)

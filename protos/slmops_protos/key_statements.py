"""Trusted package-signing keys and the signed statements that change them (part of the contract).

A `KeyRing` is what one side trusts: the keys whose signatures it accepts, the keys retired for
good, and the sequence of the last statement it applied. `apply_statement` checks a
`SignedKeyStatement` against a ring and returns the ring after it:

- at least one signature by a key the ring trusts (any one is enough) over
  `STATEMENT_CONTEXT + statement`; a signature by a retired or unknown key counts for nothing;
- `sequence` greater than the ring's (an older statement, or the same one again, is a replay);
- keys given as the hex of the raw 32-byte Ed25519 key; a retired key is never added again;
- at least one trusted key remains (retiring the last one would lock the side out for good).

The fleet and the agent both fold statements with these functions; the builder writes them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from slmops_protos.manifests import is_sha256_hex, public_key_from_hex, sha256_hex
from slmops_protos.package.v1 import manifest_pb2

if TYPE_CHECKING:  # cryptography is imported where a signature is checked
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

STATEMENT_FORMAT_VERSION = 1
# Signatures cover this prefix + the statement bytes: a statement signature is never a valid
# manifest signature, nor the other way round.
STATEMENT_CONTEXT = b"slmops-key-statement-v1\0"
MAX_STATEMENT_BYTES = 64 * 1024
MAX_KEYS_PER_STATEMENT = 64
MAX_STATEMENTS = 1024  # the most a fleet keeps (and a device reads from one KeyStatements)


class KeyStatementError(ValueError):
    """A key statement is malformed, not signed by a trusted key, a replay, or would break the ring."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class KeyRing:
    """Trusted and retired keys (lowercase hex of the raw key) and the last applied sequence."""

    trusted: tuple[str, ...] = ()
    retired: frozenset[str] = field(default_factory=frozenset)
    sequence: int = 0

    @classmethod
    def of(cls, trusted: Iterable[str], retired: Iterable[str] = (), sequence: int = 0) -> KeyRing:
        """A ring of `trusted` (normalised, duplicates and retired keys left out)."""
        gone = frozenset(normalize_key(k) for k in retired)
        keys = [normalize_key(k) for k in trusted]
        return cls(tuple(k for k in dict.fromkeys(keys) if k not in gone), gone, sequence)

    def public_keys(self) -> list[Ed25519PublicKey]:
        return [public_key_from_hex(k) for k in self.trusted]

    def retired_keys(self) -> list[Ed25519PublicKey]:
        return [public_key_from_hex(k) for k in sorted(self.retired)]

    def to_json(self) -> dict[str, object]:
        return {
            "sequence": self.sequence,
            "trusted": [{"key": k, "key_id": hex_key_id(k)} for k in self.trusted],
            "retired": [{"key": k, "key_id": hex_key_id(k)} for k in sorted(self.retired)],
        }


def normalize_key(value: str) -> str:
    """The lowercase hex of a raw Ed25519 public key; KeyStatementError if it is not one. (A raw
    Ed25519 public key is any 32 bytes, as cryptography takes them: checked without importing it.)"""
    text = value.strip().lower()
    if not is_sha256_hex(text):  # 64 hex digits, the same shape as a SHA-256's
        raise KeyStatementError(f"not an Ed25519 public key in hex: {value[:20]!r}")
    return text


def hex_key_id(value: str) -> str:
    """`manifests.key_id` of the key whose raw bytes `value` is the hex of."""
    return sha256_hex(bytes.fromhex(value))[:16]


def parse_signed_statement(data: bytes) -> tuple[manifest_pb2.SignedKeyStatement, manifest_pb2.KeyStatement]:
    """Parse a signed statement and its statement (nothing verified yet)."""
    if len(data) > MAX_STATEMENT_BYTES:
        raise KeyStatementError(f"key statement is {len(data)} bytes (limit {MAX_STATEMENT_BYTES})")
    signed = manifest_pb2.SignedKeyStatement()
    statement = manifest_pb2.KeyStatement()
    try:
        signed.ParseFromString(data)
        statement.ParseFromString(signed.statement)
    except DecodeError:
        raise KeyStatementError("not a signed key statement (does not parse)") from None
    if statement.format_version != STATEMENT_FORMAT_VERSION:
        raise KeyStatementError(f"unsupported key statement format_version {statement.format_version}")
    return signed, statement


def statement_signer(signed: manifest_pb2.SignedKeyStatement, ring: KeyRing) -> str:
    """The key id of the first trusted key whose signature is valid; KeyStatementError if none."""
    from cryptography.exceptions import InvalidSignature

    trusted = {hex_key_id(k): public_key_from_hex(k) for k in ring.trusted}
    retired = {hex_key_id(k) for k in ring.retired}
    if not signed.signatures:
        raise KeyStatementError("key statement is not signed")
    message = STATEMENT_CONTEXT + signed.statement
    for sig in signed.signatures:
        key = trusted.get(sig.key_id)
        if key is None:
            continue
        try:
            key.verify(sig.signature, message)
        except InvalidSignature:
            raise KeyStatementError(f"bad signature by key {sig.key_id} on the key statement") from None
        return sig.key_id
    names = ", ".join(s.key_id[:16] for s in signed.signatures)
    if any(s.key_id in retired for s in signed.signatures):
        raise KeyStatementError(f"key statement signed by a retired key ({names})")
    raise KeyStatementError(f"key statement signed only by untrusted keys ({names})")


def apply_statement(ring: KeyRing, data: bytes) -> tuple[KeyRing, manifest_pb2.KeyStatement]:
    """The ring after the signed statement `data` (see the module's rules), and the statement."""
    signed, statement = parse_signed_statement(data)
    _check_sequence(ring, statement)
    statement_signer(signed, ring)
    return _change(ring, statement), statement


def fold_statements(ring: KeyRing, chain: Iterable[bytes]) -> KeyRing:
    """The ring after statements checked when they were recorded (their signers are not checked
    again: the keys that signed the first ones may have left the configuration since; nor is a key
    required to remain, the configuration being the operator's to change)."""
    for data in chain:
        _, statement = parse_signed_statement(data)
        ring = _change(ring, statement, keep_one=False)
    return ring


def _check_sequence(ring: KeyRing, statement: manifest_pb2.KeyStatement) -> None:
    if statement.sequence <= ring.sequence:
        raise KeyStatementError(
            f"key statement {statement.sequence} is a replay: statement {ring.sequence} is already applied"
        )


def _change(ring: KeyRing, statement: manifest_pb2.KeyStatement, *, keep_one: bool = True) -> KeyRing:
    _check_sequence(ring, statement)
    if len(statement.add_keys) + len(statement.retire_keys) > MAX_KEYS_PER_STATEMENT:
        raise KeyStatementError(f"key statement names more than {MAX_KEYS_PER_STATEMENT} keys")
    if not statement.add_keys and not statement.retire_keys:
        raise KeyStatementError("key statement adds and retires no key")
    add = [normalize_key(k) for k in statement.add_keys]
    retire = {normalize_key(k) for k in statement.retire_keys}
    back = [k for k in add if k in ring.retired or k in retire]
    if back:
        raise KeyStatementError(f"key statement adds retired key {hex_key_id(back[0])}")
    retired = ring.retired | retire
    trusted = tuple(k for k in dict.fromkeys([*ring.trusted, *add]) if k not in retired)
    if keep_one and not trusted:
        raise KeyStatementError("key statement would retire the last trusted key")
    return KeyRing(trusted, retired, statement.sequence)


def apply_chain(ring: KeyRing, chain: Iterable[bytes]) -> tuple[KeyRing, int, str]:
    """Apply, in order, the statements of `chain` newer than the ring's sequence. Returns the ring
    after those that passed, how many were applied, and why the first bad one was refused ("" if
    none was): nothing after a bad statement is applied."""
    applied = 0
    for data in chain:
        try:
            _, statement = parse_signed_statement(data)
            if statement.sequence <= ring.sequence:
                continue
            ring, _ = apply_statement(ring, data)
        except KeyStatementError as exc:
            return ring, applied, exc.reason
        applied += 1
    return ring, applied, ""

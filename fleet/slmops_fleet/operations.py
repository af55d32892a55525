"""The fleet's operations, what it does for its HTTP API: enrollment, packages and blobs, releases
and rollouts, reading devices and status.

The API translates HTTP to these calls and back and nothing more; every rule lives here, in the
rollout rules (`slmops_fleet.rollouts`) or in the store. Errors are `slmops_fleet.errors` types,
mapped to status codes in `http_api.py`.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from slmops_fleet.blobstore import BlobStore, BlobWriter
from slmops_fleet.codec import desired_to_pb
from slmops_fleet.desired_order import publish_newest_last
from slmops_fleet.distribution import BlobDistributor, Publisher, PublishHandle
from slmops_fleet.errors import Conflict, InvalidRequest, NotFound, ProvisioningError, TooLarge, Unavailable
from slmops_fleet.provisioning import Provisioner
from slmops_fleet.rollouts.gates import Gates
from slmops_fleet.rollouts.plan import RolloutPlan
from slmops_fleet.rollouts.waves import PlanError, parse_waves
from slmops_fleet.settings import FleetSettings
from slmops_fleet.signing_keys import SigningKeys
from slmops_fleet.store import Store
from slmops_fleet.store.devices import hash_secret
from slmops_fleet.store.records import BlobStatsDelta, DesiredRecord, NewPackage
from slmops_protos import __version__
from slmops_protos.manifests import (
    PackageError,
    is_sha256_hex,
    key_id,
    package_id,
    parse_signed_manifest,
    verify_signed_manifest,
)
from slmops_protos.topics import Topics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerInfo:
    """The broker address devices are given (and `fleet.json` records)."""

    host: str
    port: int
    topic_root: str
    embedded: bool
    tls: bool = False
    ca_pem: str | None = field(default=None, repr=False)  # the CA devices verify the broker with (None: system CAs)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def load_trusted_keys(settings: FleetSettings) -> list[Ed25519PublicKey]:
    """The configured keys plus <data dir>/trusted-keys/*.pub; a bad file is a StartupError naming it."""
    from slmops_fleet.errors import StartupError

    paths = list(settings.signing_keys)
    if settings.trusted_keys_dir.is_dir():
        paths += sorted(settings.trusted_keys_dir.glob("*.pub"))
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        try:
            key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(path.read_text().strip()))
        except FileNotFoundError:
            raise StartupError(f"trusted signing key not found: {path}") from None
        except (ValueError, OSError) as exc:
            raise StartupError(f"{path} is not a hex Ed25519 public key (as `slmops builder keygen` writes)") from exc
        keys[key_id(key)] = key
    return list(keys.values())


class FleetOperations:
    def __init__(
        self,
        settings: FleetSettings,
        store: Store,
        blobs: BlobStore,
        *,
        keys: SigningKeys,
        provisioner: Provisioner,
        publisher: Publisher,
        distributor: BlobDistributor,
        broker: BrokerInfo,
        mqtt_connected: Any = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.blobs = blobs
        self.keys = keys
        self.provisioner = provisioner
        self.publisher = publisher
        self.distributor = distributor
        self.broker = broker
        self.topics = Topics(settings.topic_root)
        self._mqtt_connected = mqtt_connected
        self.driver: Any = None  # the RolloutDriver, once the server started it
        self.limits: Callable[[], dict[str, Any]] | None = None  # what devices had refused (`counters`)
        self.started_monotonic = time.monotonic()
        self.url = ""
        self.fleet_ca_pem: str | None = None

    # --- enrollment ---------------------------------------------------------------------------

    def create_token(self, ttl_s: int | None) -> dict[str, Any]:
        ttl = self.settings.token_default_ttl_s if ttl_s is None else ttl_s
        if not 1 <= ttl <= self.settings.token_max_ttl_s:
            raise InvalidRequest(f"ttl_s must be between 1 and {self.settings.token_max_ttl_s} seconds, got {ttl}")
        token, expires = self.store.create_token(ttl)
        return {"token": token, "expires_at": expires.isoformat(), "ttl_s": ttl}

    def enroll(
        self, *, token: str, public_key: str, name: str, inventory: dict[str, Any], fleet_url: str
    ) -> dict[str, Any]:
        password = secrets.token_urlsafe(32)
        provisioned: list[str] = []

        def provision(device_id: str) -> None:
            try:
                self.provisioner.add_device(device_id, password)
            except ProvisioningError as exc:
                raise Unavailable(f"cannot create the device's broker credentials: {exc.reason}") from exc
            provisioned.append(device_id)

        try:
            device = self.store.enroll(
                token,
                public_key=public_key,
                name=name,
                inventory=inventory,
                mqtt_password_hash=hash_secret(password),
                before_commit=provision,
            )
        except Exception:
            for device_id in provisioned:  # the transaction did not commit: take the credentials back
                try:
                    self.provisioner.remove_device(device_id)
                except Exception:
                    log.exception("could not remove broker credentials of %s after a failed enrollment", device_id)
            raise
        log.info("enrolled device %s (%s)", device.id, name or "no name")
        self.wake_driver(targeting=True)  # the device may be in a group with a release assigned
        return {
            "device_id": device.id,
            "fleet_url": self.settings.public_url or fleet_url,
            "mqtt": {
                "host": self.broker.host or urlsplit(fleet_url).hostname or "127.0.0.1",
                "port": self.broker.port,
                "username": device.id,
                "password": password,
                "topic_root": self.broker.topic_root,
                "tls": self.broker.tls,
                "ca_pem": self.broker.ca_pem,
            },
            **self._key_pins(),
            # what the device verifies the fleet's HTTPS with from now on (None: plaintext on loopback)
            "fleet_ca_pem": self.fleet_ca_pem,
        }

    def _key_pins(self) -> dict[str, Any]:
        """What a device pins at enrollment: the keys trusted now and the last key statement's sequence."""
        ring = self.keys.ring()
        return {"signing_keys": list(ring.trusted), "key_sequence": ring.sequence}

    # --- packages and blobs -------------------------------------------------------------------

    def add_package(self, data: bytes) -> dict[str, Any]:
        ring = self.keys.ring()
        trusted_keys = ring.public_keys()
        try:
            signed = parse_signed_manifest(data)
            manifest = verify_signed_manifest(signed, trusted_keys, ring.retired_keys())
        except PackageError as exc:
            raise InvalidRequest(f"package rejected: {exc.reason}") from exc
        pid = package_id(signed.manifest)
        trusted = {key_id(k) for k in trusted_keys}
        signer = next((s.key_id for s in signed.signatures if s.key_id in trusted), "")
        base: str | None = None
        if manifest.kind == "adapter":
            paths = {f.path for f in manifest.files}
            if len(manifest.adapters) != 1 or not manifest.adapters[0].base_package_id:
                raise InvalidRequest("package rejected: an adapter package names exactly one adapter bound to a base")
            if manifest.adapters[0].path not in paths:
                raise InvalidRequest(
                    f"package rejected: adapter file {manifest.adapters[0].path!r} is not one of the package's files"
                )
            base = manifest.adapters[0].base_package_id.lower()
        created = self.store.add_package(
            NewPackage(
                id=pid,
                name=manifest.name,
                version=manifest.version,
                kind=manifest.kind,
                profile=manifest.profile.name,
                signed_by=signer,
                signed_manifest=signed.SerializeToString(),
                files=[(f.path, f.sha256, f.size) for f in manifest.files],
                provider=(manifest.profile.execution_provider or "cpu").lower(),
                precision=manifest.profile.precision.lower(),
                min_memory_bytes=manifest.profile.min_memory_bytes,
                base_package_id=base,
                cpu_features=tuple(sorted({f.strip().lower() for f in manifest.profile.cpu_features if f.strip()})),
            )
        )
        pkg = self.store.get_package(pid)
        log.info(
            "package %s %s %s (%s): %s, %d blobs missing",
            pkg.name, pkg.version, pid[:12], pkg.profile, "new" if created else "known", len(pkg.missing_blobs),
        )  # fmt: skip
        return {**pkg.to_json(), "package_id": pid, "created": created}

    def blob_writer(self, sha256: str, content_length: int | None) -> BlobWriter | None:
        """A writer for an upload, or None if the blob is already stored."""
        if not is_sha256_hex(sha256):
            raise InvalidRequest(f"not a lowercase hex SHA-256: {sha256[:80]!r}")
        expected = self.store.blob_expected_size(sha256)
        if expected is None:
            raise NotFound(f"no uploaded package lists blob {sha256}; upload its manifest first")
        if expected > self.settings.max_blob_bytes:
            raise TooLarge(
                f"blob {sha256} is {expected} bytes, over this fleet's limit of {self.settings.max_blob_bytes}"
            )
        if content_length is not None and content_length != expected:
            raise InvalidRequest(
                f"blob {sha256} is {expected} bytes per its manifest, the request sends {content_length}"
            )
        recorded = self.store.get_blob(sha256)
        if recorded is not None and self.blobs.holds(recorded):
            return None
        self.blobs.create()
        return self.blobs.writer(sha256, expected)

    def blob_committed(self, writer: BlobWriter) -> dict[str, Any]:
        location = self.blobs.keep(writer)
        if not self.store.add_blob(writer.sha256, writer.size, location):
            self.blobs.discard(location)  # another upload of it was recorded first: it lands once
        log.info("blob %s stored (%d bytes)", writer.sha256[:12], writer.size)
        return {"sha256": writer.sha256, "size": writer.size, "stored": True}

    def blob_path(self, relpath: str) -> Path:
        return self.settings.data_dir / relpath

    # --- rollouts -----------------------------------------------------------------------------

    def create_release(self, name: str, version: str, package_refs: list[str]) -> dict[str, Any]:
        release = self.store.create_release(name, version, package_refs)
        log.info("release %s: %d packages", release.ref, len(release.packages))
        return release.to_json()

    def list_releases(self) -> list[dict[str, Any]]:
        return [r.to_json() for r in self.store.list_releases()]

    def get_release(self, ref: str) -> dict[str, Any]:
        return self.store.get_release(ref).to_json()

    def create_rollout(
        self,
        package_ref: str | None,
        target: str | list[str],
        *,
        release: str | None = None,
        waves: list[str] | str | None = None,
        soak_s: float = 0.0,
        wave_timeout_s: float | None = None,
        gates: dict[str, Any] | None = None,
        selector: str = "",
    ) -> dict[str, Any]:
        """Start a rollout of a package or of a release (NAME@VERSION or id; each device gets the
        variant `select_variant` picks): its first wave at once, the others by the rollout driver.
        `selector` narrows the target by tags and inventory (see `slmops_fleet.rollouts.selectors.parse_selector`)."""
        plan = make_plan(waves, soak_s, wave_timeout_s, gates, selector)
        package_id, release_id = self.what_to_roll_out(package_ref, release)
        if isinstance(target, str) and target != "all":
            raise InvalidRequest('target is "all" or a list of device ids')
        rollout, desired = self.store.create_rollout(package_id, target, plan, release_id=release_id)
        self.publish_desired(desired)
        log.info(
            "rollout %s: %s %s to %d devices in %d waves (%d now)",
            rollout.id, rollout.release or rollout.package_name, rollout.package_version, len(rollout.devices),
            len(rollout.waves), len(desired),
        )  # fmt: skip
        self.wake_driver()
        return rollout.to_json()

    def assign_group(
        self,
        name: str,
        *,
        package_ref: str | None = None,
        release: str | None = None,
        waves: list[str] | str | None = None,
        soak_s: float = 0.0,
        wave_timeout_s: float | None = None,
        gates: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Assign a release (or package) to a group: it keeps applying to the devices that join
        (`slmops_fleet.store.targeting`); returns the group and the rollout started now, if any."""
        plan = make_plan(waves, soak_s, wave_timeout_s, gates)
        package_id, release_id = self.what_to_roll_out(package_ref, release)
        group, rollout, desired = self.store.assign_group(name, plan, package_id=package_id, release_id=release_id)
        self.publish_desired(desired)
        self.wake_driver()
        return {"group": group, "rollout": rollout.to_json() if rollout else None}

    def what_to_roll_out(self, package_ref: str | None, release: str | None) -> tuple[str | None, str | None]:
        """(package id, release id) of a package or a release that may be rolled out: signed by a key
        trusted now, every blob uploaded."""
        if (package_ref is None) == (release is None):
            raise InvalidRequest("name a package or a release to roll out (exactly one)")
        out: tuple[str | None, str | None]
        if release is not None:
            rel = self.store.get_release(release)
            packages, out = rel.packages, (None, rel.id)
        else:
            assert package_ref is not None
            packages = [self.store.get_package(package_ref)]
            out = (packages[0].id, None)
        for pkg in packages:
            self.keys.check_package(pkg.signed_manifest)
            if pkg.missing_blobs:
                raise Conflict(
                    f"package {pkg.id[:12]} is incomplete: {len(pkg.missing_blobs)} blobs not uploaded yet "
                    "(run `slmops fleet package upload` again)"
                )
        return out

    def control_rollout(self, rollout_ref: str, action: str, reason: str = "") -> dict[str, Any]:
        """pause | resume | cancel a rollout."""
        rollout = self.store.control_rollout(self._rollout_id(rollout_ref), action, reason)
        log.info("rollout %s: %s (%s)", rollout.id, action, rollout.state)
        self.wake_driver()
        return rollout.to_json()

    def rollback_rollout(self, rollout_ref: str) -> dict[str, Any]:
        """Return every device the rollout changed to the package it had before, as a new rollout."""
        rollout, desired = self.store.rollback_rollout(self._rollout_id(rollout_ref))
        self.publish_desired(desired)
        log.info("rollout %s: rollback of %s to %d devices", rollout.id, rollout.rollback_of, len(rollout.devices))
        self.wake_driver()
        return rollout.to_json()

    def wake_driver(self, *, targeting: bool = False) -> None:
        if self.driver is not None:
            self.driver.wake(targeting=targeting)

    def _rollout_id(self, ref: str) -> str:
        if ref != "latest":
            return ref
        rollouts = self.store.list_rollouts()
        if not rollouts:
            raise NotFound("no rollouts yet")
        return rollouts[-1].id

    def publish_desired(self, records: list[DesiredRecord]) -> None:
        """Publish desired states (retained), the newest of each device last (`desired_order`). Each
        is queued on the fleet's connection before the distributor hears of it: a chunk published
        after that reaches the device after its state."""

        def publish(d: DesiredRecord) -> PublishHandle:
            payload = desired_to_pb(d, self.settings.chunk_size)
            handle = self.publisher.publish(self.topics.desired(d.device_id), payload, qos=1, retain=True)
            self.distributor.fetch_started(d.device_id, d.generation)
            return handle

        publish_newest_last(records, publish, self.store.latest_desired_states)

    def republish(self) -> None:
        """Everything retained the fleet owes its devices (its MQTT session (re)connected)."""
        self.keys.publish()
        self.republish_desired()

    def republish_desired(self) -> None:
        records = self.store.latest_desired_states()
        self.publish_desired(records)
        if records:
            log.info("republished the desired state of %d devices", len(records))

    # --- reading ------------------------------------------------------------------------------

    def list_packages(self) -> list[dict[str, Any]]:
        return [p.to_json() for p in self.store.list_packages()]

    def get_package(self, ref: str) -> dict[str, Any]:
        return self.store.get_package(ref).to_json()

    def list_devices(self) -> list[dict[str, Any]]:
        return [d.to_json() for d in self.store.list_devices()]

    def get_device(self, device_id: str) -> dict[str, Any]:
        return self.store.get_device(device_id).to_json()

    def update_device_tags(self, device_id: str, add: list[str], remove: list[str]) -> dict[str, Any]:
        device = self.store.update_device_tags(device_id, add=add, remove=remove).to_json()
        self.wake_driver(targeting=True)  # the device may have joined a group with a release assigned
        return device

    def device_telemetry(self, device_id: str, limit: int) -> list[dict[str, Any]]:
        self.store.get_device(device_id)
        return [asdict(t) for t in self.store.telemetry(device_id, limit)]

    def telemetry_series(self, device_id: str | None, since_s: float, points: int) -> dict[str, Any]:
        """The telemetry of the last `since_s` seconds (one device's, or the whole fleet's) in at most
        `points` buckets of at least a second each."""
        if device_id is not None:
            self.store.get_device(device_id)
        bucket_ms = max(1000, math.ceil(since_s * 1000 / points))
        since_ms = int(time.time() * 1000 - since_s * 1000)
        series = self.store.telemetry_series(device_id, since_ms, bucket_ms)
        return {"device_id": device_id, "bucket_ms": bucket_ms, "since_ms": since_ms, "points": series}

    def telemetry_latest(self, since_s: float) -> dict[str, dict[str, Any]]:
        """Per device that reported in the last `since_s` seconds: its tokens/s, memory and newest sample."""
        return self.store.telemetry_latest(int(time.time() * 1000 - since_s * 1000))

    def list_rollouts(self) -> list[dict[str, Any]]:
        return [r.to_json() for r in self.store.list_rollouts()]

    def get_rollout(self, rollout_id: str) -> dict[str, Any]:
        return self.store.get_rollout(self._rollout_id(rollout_id)).to_json()

    def explain_rollout(self, rollout_ref: str, device_id: str | None = None) -> dict[str, Any]:
        """Per device: the variant chosen and why, and why each other candidate was or was not taken."""
        rollout = self.store.get_rollout(self._rollout_id(rollout_ref))
        targets = [t for t in rollout.devices if device_id is None or t.device_id == device_id]
        if device_id is not None and not targets:
            raise NotFound(f"device {device_id} is not a target of rollout {rollout.id}")
        devices = []
        for t in targets:
            sel = t.selection or {
                "package_id": t.package_id,
                "reason": "the rollout names one package (made before selection was recorded)",
                "candidates": [],
            }
            devices.append(
                {
                    "device_id": t.device_id,
                    "state": t.state,
                    "package_id": sel.get("package_id"),
                    "reason": sel.get("reason", ""),
                    "candidates": sel.get("candidates", []),
                }
            )
        return {"rollout_id": rollout.id, "release": rollout.release, "devices": devices}

    def stats(self) -> dict[str, Any]:
        self.distributor.flush_stats()
        blobs = self.store.blob_stats()
        total = BlobStatsDelta()
        for b in blobs:
            total.add(b.stats)
        return {
            "totals": asdict(total),
            "blobs": [b.to_json() for b in blobs],
            "active_transfers": self.distributor.active(),
        }

    def mqtt_connected(self) -> bool:
        return bool(self._mqtt_connected()) if callable(self._mqtt_connected) else False

    def status(self) -> dict[str, Any]:
        counts = self.store.counts()
        stats = self.stats()
        return {
            "version": __version__,
            "url": self.url,
            "uptime_s": round(time.monotonic() - self.started_monotonic, 1),
            "data_dir": str(self.settings.data_dir),
            "database": _redact(self.store.url),
            "mqtt": {**self.broker.to_json(), "connected": self.mqtt_connected()},
            "trusted_keys": [key_id(k) for k in self.keys.trusted()],
            "rollout_driver": {
                "holder": getattr(self.driver, "holder", None),
                "leading": bool(getattr(self.driver, "leading", False)),
            },
            **counts,
            "transfer": stats["totals"],
            "active_transfers": stats["active_transfers"],
            "limits": self.limits() if self.limits is not None else {},
            "now": datetime.now().astimezone().isoformat(),
        }


def make_plan(
    waves: list[str] | str | None,
    soak_s: float = 0.0,
    wave_timeout_s: float | None = None,
    gates: dict[str, Any] | None = None,
    selector: str = "",
) -> RolloutPlan:
    """A rollout plan from what the operator gave, or an InvalidRequest saying what is wrong."""
    try:
        specs = parse_waves(waves)
        return RolloutPlan(
            waves=[str(w) for w in specs],
            soak_s=float(soak_s),
            wave_timeout_s=wave_timeout_s,
            gates=Gates(**(gates or {})),
            selector=selector.strip(),
        )
    except (PlanError, TypeError) as exc:
        raise InvalidRequest(f"bad rollout plan: {exc}") from exc


def _redact(url: str) -> str:
    """A database URL without its password."""
    head, sep, tail = url.partition("://")
    if not sep or "@" not in tail:
        return url
    creds, _, host = tail.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{head}://{user}:***@{host}"

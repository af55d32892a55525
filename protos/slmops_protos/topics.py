"""MQTT topic names and the per-device access rules (part of the contract)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_ROOT = "slmops/v1"


@dataclass(frozen=True)
class Topics:
    root: str = DEFAULT_ROOT

    def desired(self, device_id: str) -> str:
        return f"{self.root}/devices/{device_id}/desired"

    def reported(self, device_id: str) -> str:
        return f"{self.root}/devices/{device_id}/reported"

    def telemetry(self, device_id: str) -> str:
        return f"{self.root}/devices/{device_id}/telemetry"

    def blob_requests(self, device_id: str) -> str:
        return f"{self.root}/devices/{device_id}/blob-requests"

    def device_blobs(self, device_id: str) -> str:
        return f"{self.root}/devices/{device_id}/blobs"

    def credentials(self, device_id: str) -> str:
        return f"{self.root}/devices/{device_id}/credentials"

    def credentials_ack(self, device_id: str) -> str:
        return f"{self.root}/devices/{device_id}/credentials-ack"

    def blob_chunks(self, sha256: str) -> str:
        return f"{self.root}/blobs/{sha256}/chunks"

    @property
    def all_blob_chunks(self) -> str:
        return f"{self.root}/blobs/+/chunks"

    @property
    def keys(self) -> str:
        """The fleet's key statements (retained `KeyStatements`), for every device."""
        return f"{self.root}/keys"

    def device_publish_acl(self, device_id: str) -> list[str]:
        """The only topics a device may publish to."""
        return [
            self.reported(device_id),
            self.telemetry(device_id),
            self.blob_requests(device_id),
            self.credentials_ack(device_id),
        ]

    def device_subscribe_acl(self, device_id: str) -> list[str]:
        """The only topic filters a device may subscribe to."""
        return [
            self.desired(device_id),
            self.device_blobs(device_id),
            self.all_blob_chunks,
            self.credentials(device_id),
            self.keys,
        ]

    def fleet_subscriptions(self) -> list[str]:
        """What the fleet listens to."""
        return [
            f"{self.root}/devices/+/reported",
            f"{self.root}/devices/+/telemetry",
            f"{self.root}/devices/+/blob-requests",
            f"{self.root}/devices/+/credentials-ack",
        ]

    def device_of(self, topic: str) -> str | None:
        """The device id in a devices/{id}/... topic, else None."""
        prefix = f"{self.root}/devices/"
        if not topic.startswith(prefix):
            return None
        rest = topic[len(prefix) :].split("/")
        return rest[0] if len(rest) == 2 and rest[0] else None


def chunk_count(size: int, chunk_size: int) -> int:
    return max(1, -(-size // chunk_size))

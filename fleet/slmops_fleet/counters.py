"""What the fleet refused or dropped from devices, in one place for `/v1/status` (`limits`) and
`slmops fleet status`: the embedded broker's refusals (oversized packets, wills outside a device's
ACL), the fleet's MQTT client's (retained messages on device topics cleared), the blob-request
policy's, ingest's, and telemetry retention's. With an external broker the
broker's own refusals are not seen by the fleet (Mosquitto logs them): they read None."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slmops_fleet.embedded_broker import EmbeddedBroker
from slmops_fleet.ingest import Ingest
from slmops_fleet.mqtt_client import FleetMqtt
from slmops_fleet.retention import TelemetryRetention


@dataclass
class LimitCounters:
    ingest: Ingest
    broker: EmbeddedBroker | None  # None: an external broker
    retention: TelemetryRetention
    mqtt: FleetMqtt

    def to_json(self) -> dict[str, Any]:
        counts = self.ingest.counters
        policy = self.ingest.blob_policy
        broker = self.broker.counters if self.broker is not None else None
        return {
            "mqtt_oversized_packets": broker.oversized_packets if broker else None,
            "mqtt_wills_refused": broker.wills_refused if broker else None,
            "mqtt_retained_device_messages_cleared": self.mqtt.retained_cleared,
            "blob_requests_rate_limited": policy.counters.rate_limited if policy else 0,
            "blob_requests_refused_chunk_size": policy.counters.refused_chunk_size if policy else 0,
            "blob_requests_resized": policy.counters.resized if policy else 0,
            "telemetry_batches_refused": counts.telemetry_refused,
            "messages_malformed": counts.malformed,
            "messages_unknown_device": counts.unknown_device,
            "messages_dropped_queue_full": counts.dropped_queue_full,
            "telemetry_dropped_by_retention": self.retention.counters.dropped_rows,
            "retention": self.retention.to_json(),
        }

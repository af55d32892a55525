"""The fleet's Prometheus `/metrics`: a collector that reads the fleet's state at scrape time (the
database through `store.metrics`, the distributor's blob figures, ingest's queues and counters, the
MQTT client's counters, what was refused or dropped) and the HTTP latency histogram, measured by a
small ASGI middleware (`HttpTimer`). Every name starts with `slmops_fleet_`; README.md has the table.

The device telemetry figures are each device's newest sample, summed per active package, per tag (a
device with several tags counts under each) and per named group (a device counts under each group it
is a member of, as `group=NAME` selects it, not only the assigned group it follows); time to first
token is the mean of the devices'. Each group's members, and an assigned group's followers, are
counted too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from slmops_fleet.http_guard import METRICS_PATH, App, Message, Receive, Scope, Send
from slmops_fleet.store.metrics import DeviceSample, MetricsSnapshot

if TYPE_CHECKING:
    from fastapi import FastAPI

    from slmops_fleet.ingest import Ingest
    from slmops_fleet.mqtt_client import FleetMqtt
    from slmops_fleet.operations import FleetOperations

PREFIX = "slmops_fleet_"
# What `/v1/status` `limits` counts, as `slmops_fleet_dropped_total{reason}` (None: not seen here).
_DROPPED = (
    "mqtt_oversized_packets",
    "mqtt_wills_refused",
    "blob_requests_rate_limited",
    "blob_requests_refused_chunk_size",
    "telemetry_batches_refused",
    "messages_malformed",
    "messages_unknown_device",
    "messages_dropped_queue_full",
    "telemetry_dropped_by_retention",
)


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, labels=list(labels))


def telemetry_families(
    prefix: str, label: Sequence[str], groups: dict[tuple[str, ...], list[DeviceSample]]
) -> list[Metric]:
    """The device telemetry figures of each group (its label values -> its devices' newest samples)."""
    figures: list[tuple[str, str, Callable[[list[DeviceSample]], float]]] = [
        ("devices_reporting", "devices with a telemetry sample", lambda xs: len(xs)),
        ("tokens_per_second", "sum of the devices' newest decode tokens/s", lambda xs: sum(x.tokens_per_s for x in xs)),
        (
            "ttft_ms",
            "mean of the devices' newest time to first token (ms)",
            lambda xs: sum(x.ttft_ms for x in xs) / len(xs),
        ),
        ("requests", "sum of the devices' request counters", lambda xs: sum(x.requests_total for x in xs)),
        ("errors", "sum of the devices' error counters", lambda xs: sum(x.errors_total for x in xs)),
        ("memory_used_bytes", "sum of the devices' memory in use", lambda xs: sum(x.memory_used_bytes for x in xs)),
    ]
    out: list[Metric] = []
    for name, doc, fn in figures:
        family = _gauge(f"{prefix}_{name}", f"{doc}, per {prefix}", label)
        for values, samples in sorted(groups.items()):
            family.add_metric(list(values), float(fn(samples)))
        out.append(family)
    return out


def _known(snap: MetricsSnapshot, package_id: str) -> str:
    """The package id as a label: a package the fleet holds, "" for none, "unknown" for any other id a
    device reported (a device's report cannot add labels of its own choosing)."""
    return package_id if not package_id or package_id in snap.packages else "unknown"


class FleetCollector(Collector):
    def __init__(self, service: FleetOperations, ingest: Ingest | None, mqtt: FleetMqtt | None) -> None:
        self.service, self.ingest, self.mqtt = service, ingest, mqtt

    def collect(self) -> Iterable[Metric]:
        store = self.service.store
        counts = store.counts()
        snap = store.metrics_snapshot()
        yield from self._devices(counts, snap)
        yield from self._rollouts(counts, snap)
        yield from self._transfer()
        yield from self._messages()
        yield from self._telemetry(snap)
        yield from self._groups(snap)

    def _devices(self, counts: dict[str, Any], snap: MetricsSnapshot) -> Iterator[Metric]:
        by_state = _gauge("devices", "enrolled devices by their reported update state (NEW: none yet)", ["state"])
        for state, n in sorted(counts["devices_by_state"].items()):
            by_state.add_metric([state], n)
        yield by_state
        revoked = _gauge("devices_revoked", "revoked devices (counted in slmops_fleet_devices too)")
        revoked.add_metric([], snap.revoked)
        yield revoked
        by_package = _gauge(
            "devices_by_package", "devices not revoked by active package", ["package_id", "package", "version"]
        )
        per_package: dict[str, int] = {}
        for pid, n in snap.devices_by_package.items():
            per_package[_known(snap, pid)] = per_package.get(_known(snap, pid), 0) + n
        for pid, n in sorted(per_package.items()):
            name, version = snap.packages.get(pid, ("", ""))
            by_package.add_metric([pid, name, version], n)
        yield by_package

    def _rollouts(self, counts: dict[str, Any], snap: MetricsSnapshot) -> Iterator[Metric]:
        rollouts = _gauge("rollouts", "rollouts by state", ["state"])
        for state, n in sorted(counts["rollouts_by_state"].items()):
            rollouts.add_metric([state], n)
        yield rollouts
        size = _gauge(
            "rollout_wave_size", "devices in each wave (running rollouts and the newest ones)", ["rollout", "wave"]
        )
        wave_state = _gauge("rollout_wave_info", "each wave's state (value 1)", ["rollout", "wave", "state"])
        targets = _gauge("rollout_wave_devices", "a wave's devices by target state", ["rollout", "wave", "state"])
        for w in snap.waves:
            size.add_metric([w.rollout_id, str(w.wave)], w.size)
            wave_state.add_metric([w.rollout_id, str(w.wave), w.state], 1)
            for state, n in sorted(w.targets.items()):
                targets.add_metric([w.rollout_id, str(w.wave), state], n)
        yield from (size, wave_state, targets)

    def _transfer(self) -> Iterator[Metric]:
        totals = self.service.stats()["totals"]
        sent = _counter("blob_bytes_sent", "bytes of blob chunks published", ["kind"])
        chunks = _counter("blob_chunks_sent", "blob chunks published", ["kind"])
        for kind in ("broadcast", "repair"):
            sent.add_metric([kind], totals[f"{kind}_bytes"])
            chunks.add_metric([kind], totals[f"{kind}_chunks"])
        requests = _counter("blob_requests", "blob requests from devices (whole blob or missing chunks)", ["kind"])
        requests.add_metric(["whole"], totals["whole_requests"])
        requests.add_metric(["partial"], totals["partial_requests"])
        broadcasts = _counter("broadcasts", "blob broadcasts started")
        broadcasts.add_metric([], totals["broadcasts"])
        yield from (sent, chunks, requests, broadcasts)

    def _messages(self) -> Iterator[Metric]:
        if self.mqtt is not None:
            messages = _counter("mqtt_messages", "MQTT messages through the fleet's client", ["direction"])
            size = _counter("mqtt_bytes", "MQTT payload bytes through the fleet's client", ["direction"])
            messages.add_metric(["in"], self.mqtt.messages_received)
            messages.add_metric(["out"], self.mqtt.messages_published)
            size.add_metric(["in"], self.mqtt.bytes_received)
            size.add_metric(["out"], self.mqtt.bytes_published)
            connected = _gauge("mqtt_connected", "1 while the fleet's MQTT client is connected")
            connected.add_metric([], 1 if self.mqtt.connected else 0)
            yield from (messages, size, connected)
        if self.ingest is not None:
            depth = _gauge("ingest_queue_depth", "device messages waiting to be applied", ["queue"])
            messages_q, requests_q = self.ingest.queue_depths()
            depth.add_metric(["messages"], messages_q)
            depth.add_metric(["blob_requests"], requests_q)
            c = self.ingest.counters
            reports = _counter("ingest_reports", "update reports applied")
            reports.add_metric([], c.reported)
            samples = _counter("ingest_telemetry_samples", "telemetry samples stored (rate() gives samples/s)")
            samples.add_metric([], c.telemetry_samples)
            batches = _counter("ingest_telemetry_batches", "telemetry batches stored")
            batches.add_metric([], c.telemetry_batches)
            yield from (depth, reports, samples, batches)
        limits = self.service.limits() if self.service.limits is not None else {}
        dropped = _counter(
            "dropped", "what the fleet refused or dropped from devices (as /v1/status limits)", ["reason"]
        )
        for reason in _DROPPED:
            if limits.get(reason) is not None:
                dropped.add_metric([reason], limits[reason])
        yield dropped

    def _telemetry(self, snap: MetricsSnapshot) -> Iterator[Metric]:
        by_package: dict[tuple[str, ...], list[DeviceSample]] = {}
        by_tag: dict[tuple[str, ...], list[DeviceSample]] = {}
        for x in snap.samples:
            pid = _known(snap, x.package_id)
            name, version = snap.packages.get(pid, ("", ""))
            by_package.setdefault((pid, name, version), []).append(x)
            for tag in x.tags:
                by_tag.setdefault((tag,), []).append(x)
        yield from telemetry_families("package", ["package_id", "package", "version"], by_package)
        yield from telemetry_families("tag", ["tag"], by_tag)

    def _groups(self, snap: MetricsSnapshot) -> Iterator[Metric]:
        members = _gauge("group_members", "devices (not revoked) in each named group", ["group"])
        for name, n in sorted(snap.group_members.items()):
            members.add_metric([name], n)
        following = _gauge(
            "group_following", "devices following each assigned group's release (see `group show`)", ["group"]
        )
        for name, n in sorted(snap.group_following.items()):
            following.add_metric([name], n)
        yield from (members, following)
        by_group: dict[tuple[str, ...], list[DeviceSample]] = {}
        for x in snap.samples:
            for group in x.groups:
                by_group.setdefault((group,), []).append(x)
        yield from telemetry_families("group", ["group"], by_group)


class FleetMetrics:
    """One fleet's registry: the collector and the HTTP latency histogram."""

    def __init__(self, service: FleetOperations, ingest: Ingest | None = None, mqtt: FleetMqtt | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FleetCollector(service, ingest, mqtt))
        self.http_seconds = Histogram(
            PREFIX + "http_request_duration_seconds",
            "HTTP API request latency, by method, route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def install(self, app: FastAPI) -> None:
        """Serve `/metrics` on `app` and time its requests (the token is `http_guard`'s)."""
        from fastapi import Response
        from prometheus_client import CONTENT_TYPE_LATEST

        app.add_middleware(HttpTimer, histogram=self.http_seconds)

        @app.get(METRICS_PATH, include_in_schema=False)
        def metrics() -> Response:
            return Response(self.render(), media_type=CONTENT_TYPE_LATEST)


class HttpTimer:
    """ASGI middleware timing each HTTP request into `histogram` (route: the route's path template,
    `unmatched` for paths no route has, so a scanner cannot grow the label set)."""

    def __init__(self, app: App, *, histogram: Histogram) -> None:
        self.app, self.histogram = app, histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = ["500"]

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.histogram.labels(scope["method"].upper(), route, status[0]).observe(time.perf_counter() - start)

"""`slmops agent run`: wires the updater, the model host, the gRPC server, MQTT and telemetry."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from slmops_agent.codec import blob_want_to_pb, chunk_from_pb, desired_from_pb, inventory_to_pb, report_to_pb
from slmops_agent.credentials import CredentialKeeper, Credentials, CredentialsError
from slmops_agent.errors import AgentError
from slmops_agent.httpapi import HttpServer
from slmops_agent.inventory import Inventory, collect_inventory
from slmops_agent.layout import StateLayout, StateLock
from slmops_agent.reach import require_protection, tls_from
from slmops_agent.runtime.host import ModelHost
from slmops_agent.runtime.memory import limit_arenas
from slmops_agent.runtime.metrics import Metrics
from slmops_agent.runtime.model import ModelInfo
from slmops_agent.runtime.requests import Limits
from slmops_agent.server import AgentServer, AgentStatus
from slmops_agent.settings import AgentSettings
from slmops_agent.signing_keys import KeyTrust, load_ring, parse_keys
from slmops_agent.telemetry import Sample, Telemetry, TelemetryQueue, read_temperature
from slmops_agent.update.machine import Updater
from slmops_agent.update.messages import BlobWant, Report
from slmops_protos import __version__
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.key_statements import KeyRing
from slmops_protos.states import UpdateState

if TYPE_CHECKING:
    from slmops_agent.mqtt import AgentMqtt

log = logging.getLogger(__name__)

READY_WAIT_S = 120.0  # the longest `serve` waits for the active model before it reports ready


class Agent:
    """The running agent. `serve()` runs until `request_stop()` (or SIGTERM/SIGINT)."""

    def __init__(self, settings: AgentSettings) -> None:
        limit_arenas(settings.malloc_arenas)  # before the servers' and the model's threads start
        self.settings = settings
        self.layout = StateLayout(settings.state_dir)
        self.layout.create()
        self.lock = StateLock(self.layout)
        self.started = time.monotonic()
        try:
            self.creds: Credentials | None = Credentials.load(self.layout.credentials)
        except CredentialsError as exc:
            if self.layout.credentials.exists():
                raise AgentError(str(exc)) from exc
            self.creds = None
        self.device_id = self.creds.device_id if self.creds else ""
        self.metrics = Metrics()
        self.host = ModelHost(
            queue_bound=settings.queue_bound,
            queue_per_client=settings.queue_per_client,
            limits=Limits(settings.default_max_new_tokens, settings.max_new_tokens_limit),
            metrics=self.metrics,
            stream_group_s=settings.stream_group_s,
        )
        self.inventory: Inventory = collect_inventory(settings.state_dir)
        self.mqtt: AgentMqtt | None = None
        self.telemetry: Telemetry | None = None
        self.keys = KeyTrust(self.layout, self.creds, on_change=self._keys_changed)
        self.updater = Updater(
            self.layout,
            settings,
            self.host,
            trusted_keys=parse_keys(self.keys.ring.trusted),
            retired_keys=parse_keys(sorted(self.keys.ring.retired)),
            device_id=self.device_id,
            on_report=self._publish_report,
            on_blob_request=self._publish_blob_request,
            is_connected=self._connected,
            providers=self.inventory.providers,
            memory_bytes=self.inventory.memory_bytes,
        )
        tls = tls_from(settings.tls_cert, settings.tls_key)
        # refuse at once (before anything listens) to expose an unprotected server
        if settings.grpc_tcp:
            require_protection("gRPC", settings.grpc_address.rpartition(":")[0], tls, settings.auth_token)
        if settings.metrics_port >= 0:
            require_protection("HTTP", settings.metrics_host, tls, settings.auth_token)
        self.server = AgentServer(
            self.host,
            socket_path=settings.socket_path,
            tcp_address=settings.grpc_address if settings.grpc_tcp else None,
            status=self.status,
            remove_adapter=self.remove_adapter,
            addr_file=self.layout.grpc_addr,
            tls=tls,
            token=settings.auth_token,
        )
        self.http: HttpServer | None = None
        if settings.metrics_port >= 0:
            self.http = HttpServer(
                self.host,
                address=settings.metrics_host,
                port=settings.metrics_port,
                addr_file=self.layout.metrics_addr,
                tls=tls,
                token=settings.auth_token,
            )
        self._stop: asyncio.Event | None = None

    # -- wiring -------------------------------------------------------------------------------
    def _keys_changed(self, ring: KeyRing) -> None:
        self.updater.set_keys(parse_keys(ring.trusted), parse_keys(sorted(ring.retired)))

    def _connected(self) -> bool:
        return self.mqtt is not None and self.mqtt.is_connected()

    def _inventory_pb(self) -> fleet_pb2.Inventory:
        try:
            free = shutil.disk_usage(self.layout.root).free
        except OSError:
            free = self.inventory.disk_free_bytes
        return inventory_to_pb(replace(self.inventory, disk_free_bytes=free))

    def _publish_report(self, report: Report) -> None:
        msg = report_to_pb(report, self.device_id, self._inventory_pb())
        if self.mqtt is not None:
            self.mqtt.publish_reported(msg)

    def _publish_blob_request(self, want: BlobWant) -> None:
        if self.mqtt is not None:
            self.mqtt.publish_blob_request(blob_want_to_pb(want, self.device_id))

    def remove_adapter(self, name: str) -> None:
        """`Inference.RemoveAdapter`: restage the active slot without adapter `name` (blocking)."""
        report = self.updater.remove_adapter(name, self.settings.smoke_test_budget_s + 60.0)
        if report.state is not UpdateState.COMMITTED:
            raise AgentError(f"removing adapter {name!r} rolled back: {report.reason}")

    def status(self) -> AgentStatus:
        r = self.updater.record
        installed = []
        for slot, info in r.slots.items():
            if info is not None:
                installed.append(
                    ModelInfo(
                        name=info.name,
                        version=info.version,
                        package_id=info.package_id,
                        profile=info.profile,
                        slot=slot,
                    )
                )
        model = self.host.model
        if model is not None:  # the loaded one carries its adapters
            installed = [model.info if i.package_id == model.info.package_id else i for i in installed]
        return AgentStatus(
            device_id=self.device_id,
            update_state=r.state.value,
            active_slot=r.active_slot,
            agent_version=__version__,
            uptime_s=time.monotonic() - self.started,
            installed=installed,
        )

    def _collect(self) -> Sample:
        import psutil

        mem = psutil.virtual_memory()
        tps, ttft = self.metrics.window()
        r = self.updater.record
        active = r.active
        return Sample(
            timestamp_unix_ms=int(time.time() * 1000),
            cpu_percent=float(psutil.cpu_percent(interval=None)),
            memory_used_bytes=int(mem.total - mem.available),
            memory_total_bytes=int(mem.total),
            disk_free_bytes=int(shutil.disk_usage(self.layout.root).free),
            temperature_c=read_temperature(),
            requests_total=self.metrics.requests_total,
            errors_total=self.metrics.errors_total,
            tokens_per_s=tps,
            ttft_ms=ttft,
            queue_depth=self.host.queue.depth,
            update_state=r.state,
            active_package_id=active.package_id if active else "",
        )

    def _start_fleet_link(self) -> None:
        if self.creds is None:
            log.warning("not enrolled: serving locally only (no fleet link, no telemetry)")
            return
        from slmops_agent.mqtt import AgentMqtt  # paho: only an enrolled agent links to the fleet

        s = self.settings
        updater = self.updater

        def on_desired(msg: fleet_pb2.DesiredState) -> None:
            updater.submit_desired(desired_from_pb(msg))

        def on_chunk(msg: fleet_pb2.BlobChunk) -> None:
            updater.submit_chunk(chunk_from_pb(msg))

        self.mqtt = AgentMqtt(
            self.creds,
            on_desired=on_desired,
            on_chunk=on_chunk,
            on_keys=self.keys.on_statements,
            wants_blob=updater.wants,
            on_connected=updater.notify_connected,
            keeper=CredentialKeeper(self.layout.credentials, self.creds),
            keepalive_s=s.mqtt_keepalive_s,
            reconnect_min_s=s.mqtt_reconnect_min_s,
            reconnect_max_s=s.mqtt_reconnect_max_s,
            connect_jitter_s=s.mqtt_connect_jitter_s,
        )
        mqtt = self.mqtt
        self.telemetry = Telemetry(
            TelemetryQueue(self.layout.telemetry_db, s.telemetry_queue_bound),
            device_id=self.device_id,
            interval_s=s.telemetry_interval_s,
            batch=s.telemetry_batch,
            collect=self._collect,
            publish=mqtt.publish_telemetry,
            is_connected=mqtt.is_connected,
        )
        mqtt.start()
        self.telemetry.start()

    # -- lifecycle ------------------------------------------------------------------------------
    async def serve(self, on_ready: Callable[[list[str]], None] | None = None, *, signals: bool = True) -> None:
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
        self.lock.acquire()
        try:
            addresses = await self.server.start()
            if self.http is not None:
                addresses.append(await self.http.start())
            self.updater.start()
            await loop.run_in_executor(None, self._start_fleet_link)
            # "ready" once the active model is loaded (or recovery is over): a client that starts at
            # the ready line finds the model, not an empty /v1/models or UNAVAILABLE
            await loop.run_in_executor(None, self.updater.wait_recovered, READY_WAIT_S)
            if on_ready is not None:
                on_ready(addresses)
            await self._stop.wait()
            log.info("shutting down")
        finally:
            await self._shutdown()
            if signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def _shutdown(self) -> None:
        grace = self.settings.shutdown_grace_s
        stops = [self.server.stop(grace), *([self.http.stop(grace)] if self.http is not None else [])]
        # both front ends stop accepting at once and share the grace period
        for what, outcome in zip(("gRPC", "HTTP"), await asyncio.gather(*stops, return_exceptions=True), strict=False):
            if isinstance(outcome, BaseException):
                log.error("%s shutdown failed", what, exc_info=outcome)
        self.host.close()
        loop = asyncio.get_running_loop()
        if self.telemetry is not None:
            await loop.run_in_executor(None, self.telemetry.stop)
            self.telemetry.queue.close()
        await loop.run_in_executor(None, self.updater.stop)
        if self.mqtt is not None:
            await loop.run_in_executor(None, self.mqtt.stop)
        self.lock.release()


def install_package(settings: AgentSettings, package_dir: Path, *, timeout_s: float = 600.0) -> Report:
    """Side-load a package folder into the state folder (the agent must not be running): the same
    signature check, staging, smoke test and commit as an update from the fleet."""
    from slmops_agent.update.packages import read_package_id

    layout = StateLayout(settings.state_dir)
    layout.create()
    try:
        creds: Credentials | None = Credentials.load(layout.credentials)
    except CredentialsError:
        creds = None
    pid = read_package_id(package_dir)
    with StateLock(layout):
        host = ModelHost(queue_bound=1, limits=Limits(settings.default_max_new_tokens, settings.max_new_tokens_limit))
        inventory = collect_inventory(settings.state_dir)
        ring = load_ring(layout, creds)
        updater = Updater(
            layout,
            settings,
            host,
            trusted_keys=parse_keys(ring.trusted),
            retired_keys=parse_keys(sorted(ring.retired)),
            device_id=creds.device_id if creds else "",
            providers=inventory.providers,
            memory_bytes=inventory.memory_bytes,
        )
        updater.start()
        try:
            updater.wait_recovered(timeout_s)
            writes = updater.record.writes
            updater.install_local(package_dir)
            updater.wait_for(
                lambda r: (
                    r.writes > writes and r.target_package_id == pid and r.state.value in ("COMMITTED", "ROLLED_BACK")
                ),
                timeout_s,
            )
            return updater.current_report()
        finally:
            updater.stop()
            host.close()

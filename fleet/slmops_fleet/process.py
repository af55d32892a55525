"""The whole fleet in one event loop: store, embedded broker (or an external one), MQTT client,
ingest and blob sender threads, and the HTTP API served by uvicorn.

`FleetServer` starts and stops the parts in order; `run_server` is `slmops fleet serve`
(SIGTERM/SIGINT stop it cleanly); `FleetThread` runs a fleet in a background thread for
tests and the demo.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import uvicorn

from slmops_fleet.admin_auth import AdminAuth
from slmops_fleet.blobstore import BlobStore
from slmops_fleet.broadcast_record import BroadcastRecord
from slmops_fleet.broker_access import CredentialRegistry
from slmops_fleet.counters import LimitCounters
from slmops_fleet.device_limits import BlobRequestPolicy
from slmops_fleet.distribution import BlobDistributor
from slmops_fleet.embedded_broker import EmbeddedBroker, bind_listener
from slmops_fleet.errors import FleetError, StartupError
from slmops_fleet.http_api import create_app
from slmops_fleet.ingest import Ingest
from slmops_fleet.lifecycle import DeviceLifecycle
from slmops_fleet.metrics import FleetMetrics
from slmops_fleet.mqtt_client import FleetMqtt, MqttEndpoint
from slmops_fleet.operations import BrokerInfo, FleetOperations, load_trusted_keys
from slmops_fleet.provisioning import DynsecProvisioner, EmbeddedProvisioner, NoProvisioner, Provisioner
from slmops_fleet.retention import TelemetryRetention
from slmops_fleet.rollouts.driver import RolloutDriver
from slmops_fleet.settings import FleetSettings
from slmops_fleet.shared_blobs import PostgresBlobStore
from slmops_fleet.signing_keys import SigningKeys
from slmops_fleet.store import Store
from slmops_fleet.store.leases import new_holder
from slmops_fleet.store.records import BlobRecord
from slmops_fleet.tls import WILDCARD_HOSTS, TlsFiles, client_context, fleet_tls_files, write_file
from slmops_fleet.workers import Workers, session_drainer
from slmops_protos.topics import Topics

log = logging.getLogger(__name__)


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically (temporary file, fsync, rename)."""
    write_file(path, text.encode(), private=True)


def ensure_admin_token(path: Path) -> str:
    """The admin bearer token: generated at the first start, kept 0600 in the data folder."""
    if path.is_file():
        token = path.read_text().strip()
        if token:
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
            return token
    token = secrets.token_urlsafe(32)
    _write_private(path, token + "\n")
    return token


def _dialable(host: str) -> str:
    """The address a client on this host dials for a listener on `host` (a wildcard: loopback)."""
    return "127.0.0.1" if host in WILDCARD_HOSTS else host


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the fleet stops everything in order itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@dataclass(frozen=True)
class FleetInfo:
    url: str
    admin_token: str
    mqtt: BrokerInfo
    data_dir: Path
    tls: TlsFiles | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "admin_token": self.admin_token,
            "mqtt": self.mqtt.to_json(),
            "data_dir": str(self.data_dir),
            "pid": os.getpid(),
            # the CA the admin CLI verifies an https:// fleet with
            "ca_file": str(self.tls.ca) if self.tls else None,
            "ca_fingerprint": self.tls.fingerprint if self.tls else None,
        }


class FleetServer:
    """Every part of the fleet, started and stopped in order in the running event loop."""

    def __init__(self, settings: FleetSettings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_root)
        self.store: Store | None = None
        self.registry: CredentialRegistry | None = None
        self.broker: EmbeddedBroker | None = None
        self.provisioner: Provisioner | None = None
        self.mqtt: FleetMqtt | None = None
        self.ingest: Ingest | None = None
        self.distributor: BlobDistributor | None = None
        self.service: FleetOperations | None = None
        self.driver: RolloutDriver | None = None
        self.retention: TelemetryRetention | None = None
        self.workers: Workers | None = None
        self._http: _Uvicorn | None = None
        self._http_task: asyncio.Task[None] | None = None
        self.info: FleetInfo | None = None
        self._stopping = threading.Event()  # ends background passes (the devices' ACL update)

    @property
    def url(self) -> str:
        assert self.info is not None, "the fleet is not started"
        return self.info.url

    # --- start ----------------------------------------------------------------------------------

    async def start(self) -> FleetInfo:
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> FleetInfo:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        s.trusted_keys_dir.mkdir(exist_ok=True)
        admin_token = ensure_admin_token(s.admin_token_file)
        trusted = load_trusted_keys(s)
        ports = self._read_ports()
        tls = fleet_tls_files(s)
        if tls is None and s.exposed_hosts():
            log.warning("--insecure: plaintext listener off loopback on %s", ", ".join(s.exposed_hosts()))

        store = Store(s.resolved_database_url())
        self.store = store
        try:
            await asyncio.to_thread(store.migrate)
        except Exception as exc:
            raise StartupError(f"cannot open or migrate the database {store.url.split('@')[-1]}: {exc}") from exc
        blobs = (
            PostgresBlobStore(s.blobs_dir, store.engine, s.data_dir)
            if s.blobs_in_database
            else BlobStore(s.blobs_dir, s.data_dir)
        )
        blobs.create()
        # This worker among the fleet's workers (one, unless several share a PostgreSQL database).
        holder = new_holder()
        workers = Workers(store, s.mqtt_client_id, holder, heartbeat_s=s.worker_heartbeat_s)
        await asyncio.to_thread(workers.claim)
        self.workers = workers
        if s.embedded_broker:
            others = await asyncio.to_thread(workers.others_alive)
            if others:
                raise StartupError(
                    f"another fleet worker ({others[0]}) uses this database: the embedded broker serves one worker; "
                    "run several workers on an external broker (--broker-url)"
                )

        # The broker and how device credentials reach it.
        if s.embedded_broker:
            self.registry = CredentialRegistry(self.topics)
            self.registry.load(await asyncio.to_thread(store.device_password_hashes))
            self.broker = await self._start_embedded_broker(ports.get("broker_port"), tls)
            self.provisioner = EmbeddedProvisioner(self.registry, self.broker.disconnect)
            # The fleet's own client checks the chain of its own broker, not the name it dials it by.
            endpoint = MqttEndpoint(
                _dialable(s.broker_host),
                self.broker.port,
                self.registry.fleet_username,
                self.registry.fleet_password,
                tls=client_context(tls.ca, check_hostname=False) if tls else None,
            )
            # On every interface (a wildcard): devices are told the public URL's host, else the one
            # they reached the fleet at (see FleetOperations.enroll).
            wildcard_host = urlsplit(s.public_url).hostname or "" if s.public_url else ""
            broker_info = BrokerInfo(
                host=s.public_broker_host or (wildcard_host if s.broker_host in WILDCARD_HOSTS else s.broker_host),
                port=s.public_broker_port or self.broker.port,
                topic_root=s.topic_root,
                embedded=True,
                tls=tls is not None,
                ca_pem=tls.ca_pem if tls else None,
            )
            client_id, clean = "slmops-fleet-internal", True
        else:
            ext = s.external_broker()
            broker_tls = client_context(s.broker_ca) if ext.tls else None
            endpoint = MqttEndpoint(ext.host, ext.port, ext.username, ext.password, tls=broker_tls)
            if s.broker_provisioning == "dynsec":
                admin = s.broker_admin()
                dynsec = DynsecProvisioner(admin, self.topics, tls=client_context(s.broker_ca) if admin.tls else None)
                self.provisioner = dynsec
                await asyncio.to_thread(dynsec.start)
                if ext.username:
                    await asyncio.to_thread(dynsec.ensure_fleet_access, ext.username)
            else:
                self.provisioner = NoProvisioner()
            broker_info = BrokerInfo(
                host=s.public_broker_host or ext.host,
                port=s.public_broker_port or ext.port,
                topic_root=s.topic_root,
                embedded=False,
                tls=ext.tls,
                ca_pem=s.broker_ca.read_text() if ext.tls and s.broker_ca else None,
            )
            # A stable client id per worker and a persistent session: the broker keeps device reports for
            # the worker while it restarts (or until another worker drains them: `workers`).
            client_id = s.mqtt_client_id
            clean = False

        # The HTTP socket first, so the URL is known before anything is handed out.
        http_sock = self._bind_http(ports.get("http_port"))
        http_port = http_sock.getsockname()[1]
        url = f"{'https' if tls else 'http'}://{_dialable(s.http_host)}:{http_port}"

        # MQTT side: the client, the blob sender and the ingest worker.
        mqtt = FleetMqtt(
            endpoint,
            self.topics,
            client_id=client_id,
            clean_session=clean,
            keepalive_s=s.mqtt_keepalive_s,
            reconnect_max_s=s.mqtt_reconnect_max_s,
            max_inflight=max(32, s.max_inflight * 2),
            mqtt5=not s.embedded_broker,
            share_group="" if s.embedded_broker else s.share_group,
        )
        self.mqtt = mqtt

        def blob_lookup(sha256: str) -> BlobRecord | None:
            rec = store.get_blob(sha256)
            return rec if rec is not None and blobs.ensure_local(rec) else None

        distributor = BlobDistributor(
            self.topics,
            mqtt,
            blob_lookup=blob_lookup,
            blob_path=blobs.local_path,
            stats_sink=store.add_blob_stats,
            default_chunk_size=s.chunk_size,
            rate=s.broadcast_rate,
            coalesce_window_s=s.coalesce_window_s,
            coalesce_max_s=s.coalesce_max_s,
            max_inflight=s.max_inflight,
            broker_backlog=self._backlog if self.broker is not None else None,
            # Several workers may share the database: each treats the others' broadcasts as its own.
            record=None
            if s.embedded_broker
            else BroadcastRecord(store.add_broadcast_chunks, store.broadcast_chunks_since),
        )
        self.distributor = distributor
        service = FleetOperations(
            s,
            store,
            blobs,
            keys=SigningKeys(trusted, store, mqtt, self.topics),
            provisioner=self.provisioner,
            publisher=mqtt,
            distributor=distributor,
            broker=broker_info,
            mqtt_connected=lambda: mqtt.connected,
        )
        service.url = url
        service.fleet_ca_pem = tls.ca_pem if tls else None
        self.service = service
        if not await asyncio.to_thread(service.keys.trusted):  # the configured keys and the key statements
            log.warning(
                "no trusted signing keys: package uploads are refused until you pass --trust-key or put a "
                "*.pub into %s",
                s.trusted_keys_dir,
            )
        lifecycle = DeviceLifecycle(store, self.provisioner, mqtt, self.topics)
        if isinstance(self.provisioner, DynsecProvisioner):  # devices enrolled by an older fleet
            threading.Thread(
                target=lifecycle.update_acls, args=(self._stopping,), name="slmops-fleet-acls", daemon=True
            ).start()

        def republish() -> None:  # the fleet's MQTT session (re)connected
            service.republish()
            lifecycle.republish_rotations()

        ingest = Ingest(
            store,
            self.topics,
            distributor,
            republish=republish,
            on_credentials_ack=lifecycle.confirmed,
            blob_policy=BlobRequestPolicy(s.chunk_size, rate=s.blob_request_rate, burst=s.blob_request_burst),
            max_telemetry_samples=s.telemetry_max_samples,
            # Several workers (an external broker): the rollout driver's holder alone sends blobs.
            serves_blobs=None if s.embedded_broker else lambda: self.driver is not None and self.driver.leading,
        )
        self.ingest = ingest
        mqtt.set_handlers(ingest.on_message, ingest.request_republish)
        ingest.start()
        distributor.start()
        mqtt.start()
        connected = await asyncio.to_thread(mqtt.wait_connected, 15.0)
        if not connected:
            why = mqtt.last_error or "no answer"
            if s.embedded_broker:
                raise StartupError(f"the fleet's MQTT client cannot connect to its embedded broker: {why}")
            log.warning(
                "MQTT broker %s:%d not reachable yet (%s); retrying in the background",
                endpoint.host,
                endpoint.port,
                why,
            )

        # The rollout driver: waves, soaks, gates, aborts.
        driver = RolloutDriver(store, service.publish_desired, tick_s=s.rollout_tick_s, holder=holder)
        service.driver = driver
        self.driver = driver
        workers.renewals.append(driver.renew)
        driver.start()
        self.retention = TelemetryRetention(
            store,
            max_age_s=s.telemetry_max_age_s,
            max_rows_per_device=s.telemetry_max_rows_per_device,
            interval_s=s.telemetry_retention_interval_s,
        )
        self.retention.start()
        if not s.embedded_broker:
            workers.drain = session_drainer(endpoint, self.topics, s.share_group, ingest.on_message)
        workers.start()
        service.limits = LimitCounters(ingest, self.broker, self.retention, mqtt).to_json

        # HTTP last: when it answers, everything behind it works.
        config = uvicorn.Config(
            create_app(
                service,
                auth=AdminAuth(admin_token, store),
                lifecycle=lifecycle,
                metrics=FleetMetrics(service, ingest, mqtt),
            ),
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=max(1, int(s.shutdown_grace_s)),
            ssl_certfile=str(tls.cert) if tls else None,
            ssl_keyfile=str(tls.key) if tls else None,
        )
        self._http = _Uvicorn(config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[http_sock]), name="slmops-fleet-http")
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()
                raise StartupError("the HTTP server stopped while starting")
            await asyncio.sleep(0.02)

        self.info = FleetInfo(url=url, admin_token=admin_token, mqtt=broker_info, data_dir=s.data_dir, tls=tls)
        _write_private(
            s.ports_file,
            json.dumps({"http_port": http_port, "broker_port": self.broker.port if self.broker else None}) + "\n",
        )
        _write_private(s.fleet_json, json.dumps(self.info.to_json(), indent=2) + "\n")
        log.info("fleet ready at %s (web console: %s/ui)", url, url)
        return self.info

    def _read_ports(self) -> dict[str, int]:
        try:
            data = json.loads(self.settings.ports_file.read_text())
        except (OSError, ValueError):
            return {}
        return {k: int(v) for k, v in data.items() if isinstance(v, int) and 0 < v < 65536}

    def _backlog(self) -> tuple[int, int]:
        """The embedded broker's backlog (see `EmbeddedBroker.backlog`), plus the fleet's messages not
        yet in the broker: the blob sender paces on it."""
        assert self.broker is not None and self.mqtt is not None
        pending, devices = self.broker.backlog()
        return pending + self.mqtt.unacknowledged, devices

    async def _start_embedded_broker(self, remembered: int | None, tls: TlsFiles | None) -> EmbeddedBroker:
        assert self.registry is not None
        port = self.settings.broker_port or remembered or 0
        broker = EmbeddedBroker(
            self.registry,
            host=self.settings.broker_host,
            port=port,
            ssl=tls.server_context() if tls else None,
            flag="--broker-port (SLMOPS_FLEET_BROKER_PORT)",
            max_packet_bytes=self.settings.mqtt_max_packet_bytes,
        )
        try:
            await broker.start()
        except StartupError as exc:
            if not self.settings.broker_port and remembered:
                raise StartupError(
                    f"MQTT broker port {remembered} (kept in {self.settings.ports_file} because enrolled devices "
                    "connect to it) is already in use; free it, or choose another port with --broker-port "
                    "(devices enrolled before then must enroll again)"
                ) from exc
            raise
        self.broker = broker
        return broker

    def _bind_http(self, remembered: int | None) -> socket.socket:
        s = self.settings
        flag = "--port (SLMOPS_FLEET_HTTP_PORT)"
        if s.http_port:
            return bind_listener(s.http_host, s.http_port, what="HTTP", flag=flag)
        if remembered:
            try:
                return bind_listener(s.http_host, remembered, what="HTTP", flag=flag)
            except StartupError:
                log.warning("HTTP port %d from the last start is taken; picking a free one", remembered)
        return bind_listener(s.http_host, 0, what="HTTP", flag=flag)

    # --- stop -----------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop in reverse order; safe to call more than once and after a failed start."""
        self._stopping.set()
        if self._http is not None:
            self._http.should_exit = True
            if self._http_task is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(self._http_task, timeout=self.settings.shutdown_grace_s + 5)
            self._http = None
            self._http_task = None
        if self.workers is not None:
            await self.workers.stop()
            self.workers = None
        if self.driver is not None:
            await self.driver.stop()
            self.driver = None
        if self.retention is not None:
            await self.retention.stop()
            self.retention = None
        if self.distributor is not None:
            await asyncio.to_thread(self.distributor.stop)
            self.distributor = None
        if self.mqtt is not None:
            await asyncio.to_thread(self.mqtt.stop)
            self.mqtt = None
        if self.ingest is not None:
            await asyncio.to_thread(self.ingest.stop)
            self.ingest = None
        if isinstance(self.provisioner, DynsecProvisioner):
            await asyncio.to_thread(self.provisioner.stop)
        self.provisioner = None
        if self.broker is not None:
            await self.broker.stop()
            self.broker = None
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.info is not None:
            with contextlib.suppress(OSError):
                data = json.loads(self.settings.fleet_json.read_text())
                if data.get("pid") == os.getpid() and data.get("url") == self.info.url:
                    self.settings.fleet_json.unlink()
            self.info = None


async def run_server(
    settings: FleetSettings,
    *,
    on_ready: Callable[[FleetInfo], None] | None = None,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
) -> None:
    """Run the fleet until `stop` is set or SIGTERM/SIGINT arrives (when `handle_signals`)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
    server = FleetServer(settings)
    try:
        info = await server.start()
        if on_ready is not None:
            on_ready(info)
        waiter = asyncio.create_task(stop.wait())
        assert server._http_task is not None
        done, _ = await asyncio.wait({waiter, server._http_task}, return_when=asyncio.FIRST_COMPLETED)
        if server._http_task in done and not stop.is_set():
            log.error("the HTTP server stopped unexpectedly")
        waiter.cancel()
        log.info("stopping the fleet")
    finally:
        await server.stop()
        for sig in installed:
            loop.remove_signal_handler(sig)


class FleetThread:
    """A fleet in a background thread with its own event loop (tests, the demo).

    with FleetThread(settings) as fleet:
        httpx.get(fleet.url + "/healthz")
    """

    def __init__(self, settings: FleetSettings, *, start_timeout: float = 60.0) -> None:
        self.settings = settings
        self.start_timeout = start_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.server: FleetServer | None = None
        self.info: FleetInfo | None = None

    @property
    def url(self) -> str:
        assert self.info is not None
        return self.info.url

    @property
    def admin_token(self) -> str:
        assert self.info is not None
        return self.info.admin_token

    def start(self) -> FleetThread:
        self._thread = threading.Thread(target=self._main, name="slmops-fleet", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.start_timeout):
            raise StartupError(f"the fleet did not start in {self.start_timeout:.0f} s")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self.server = FleetServer(self.settings)
            try:
                self.info = await self.server.start()
            except BaseException as exc:
                self._error = exc if isinstance(exc, Exception) else FleetError(f"the fleet did not start: {exc!r}")
                self._ready.set()
                return
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await self.server.stop()

        asyncio.run(main())

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> FleetThread:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

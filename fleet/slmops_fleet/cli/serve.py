"""`slmops fleet serve`: the whole fleet in this process until Ctrl+C or SIGTERM."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from slmops_fleet.cli.common import DataDirOpt, fail
from slmops_fleet.cli.config import ConfigOpt, load_fleet_settings


def serve(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    host: Annotated[
        str | None, typer.Option("--host", help="HTTP listen address (default 127.0.0.1); off loopback: TLS.")
    ] = None,
    port: Annotated[int | None, typer.Option("--port", help="HTTP port; 0 picks a free one (default).")] = None,
    public_url: Annotated[str | None, typer.Option("--public-url", help="The fleet URL devices are told.")] = None,
    database_url: Annotated[
        str | None, typer.Option("--database-url", help="SQLAlchemy URL (default: sqlite in the data folder).")
    ] = None,
    broker_url: Annotated[
        str | None,
        typer.Option(
            "--broker-url",
            help="External broker mqtts://user:pass@host:port (mqtt:// on loopback; default: embedded amqtt).",
        ),
    ] = None,
    broker_host: Annotated[
        str | None, typer.Option("--broker-host", help="Embedded broker listen address (default 127.0.0.1).")
    ] = None,
    broker_port: Annotated[
        int | None, typer.Option("--broker-port", help="Embedded broker port; 0 picks a free one.")
    ] = None,
    broker_ca: Annotated[
        Path | None, typer.Option("--broker-ca", help="CA (PEM) of an external mqtts:// broker; devices get it too.")
    ] = None,
    tls: Annotated[
        bool | None,
        typer.Option(
            "--tls/--no-tls",
            help="HTTPS and MQTT over TLS (default: on when a listener is off loopback or --tls-cert is given).",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="Server certificate (PEM); default: a private CA in the data dir.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="Key of --tls-cert (PEM).")] = None,
    tls_ca: Annotated[
        Path | None, typer.Option("--tls-ca", help="CA that signed --tls-cert (PEM), given to devices.")
    ] = None,
    tls_host: Annotated[
        list[str] | None,
        typer.Option("--tls-host", help="Another name or address for the private CA's certificate; repeatable."),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow plaintext listeners and broker links off loopback.")
    ] = False,
    broker_provisioning: Annotated[
        str | None,
        typer.Option("--broker-provisioning", help="External broker: 'dynsec' (Mosquitto dynamic security) or 'none'."),
    ] = None,
    broker_admin_url: Annotated[
        str | None, typer.Option("--broker-admin-url", help="Dynamic-security admin mqtt://user:pass@host:port.")
    ] = None,
    public_broker_host: Annotated[
        str | None, typer.Option("--public-broker-host", help="Broker host for devices.")
    ] = None,
    public_broker_port: Annotated[
        int | None, typer.Option("--public-broker-port", help="Broker port for devices.")
    ] = None,
    topic_root: Annotated[str | None, typer.Option("--topic-root", help="MQTT topic root (default slmops/v1).")] = None,
    chunk_size: Annotated[int | None, typer.Option("--chunk-size", help="Bytes per chunk, 262144..1048576.")] = None,
    broadcast_rate: Annotated[
        int | None, typer.Option("--broadcast-rate", help="Bytes/s for all chunk transfers together; 0: no limit.")
    ] = None,
    trust_key: Annotated[
        list[Path] | None,
        typer.Option("--trust-key", help="Trusted package signing public key (*.pub); repeatable."),
    ] = None,
    log_level: Annotated[str | None, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")] = None,
    worker_id: Annotated[
        str | None,
        typer.Option("--worker-id", help="This worker's name among several (default: from the data folder)."),
    ] = None,
    share_group: Annotated[
        str | None,
        typer.Option("--share-group", help="External broker: shared-subscription group (default slmops-fleet)."),
    ] = None,
    admin_token_file: Annotated[
        Path | None,
        typer.Option("--admin-token-file", help="The owner's token file; the same for every worker of one fleet."),
    ] = None,
) -> None:
    """Run the fleet manager: HTTP API, MQTT broker (or client of an external one), database.

    Settings: flags > SLMOPS_FLEET_* > the --config file (TOML, the settings' names as keys) > defaults;
    `slmops fleet config show` prints them."""
    import asyncio
    import logging

    from slmops_fleet.errors import FleetError

    given: dict[str, Any] = {
        "data_dir": data_dir,
        "http_host": host,
        "http_port": port,
        "public_url": public_url,
        "database_url": database_url,
        "broker_url": broker_url,
        "broker_host": broker_host,
        "broker_port": broker_port,
        "broker_ca": broker_ca,
        "tls": tls,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "tls_ca": tls_ca,
        "tls_hosts": tls_host or None,
        "insecure": insecure or None,
        "broker_provisioning": broker_provisioning,
        "broker_admin_url": broker_admin_url,
        "public_broker_host": public_broker_host,
        "public_broker_port": public_broker_port,
        "topic_root": topic_root,
        "chunk_size": chunk_size,
        "broadcast_rate": broadcast_rate,
        "signing_keys": trust_key or None,
        "log_level": log_level,
        "worker_id": worker_id,
        "share_group": share_group,
        "admin_token_path": admin_token_file,
    }
    loaded = load_fleet_settings(config, given)
    settings = loaded.settings

    _configure_logging(settings.log_level)
    from slmops_fleet.process import FleetInfo, run_server

    def ready(info: FleetInfo) -> None:
        kind = "embedded amqtt" if info.mqtt.embedded else "external"
        lines = [
            "slmops fleet is running",
            *([f"  config file   {loaded.file}"] if loaded.file else []),
            f"  HTTP API      {info.url}",
            f"  MQTT broker   {info.mqtt.host or '*'}:{info.mqtt.port} ({kind}{', TLS' if info.mqtt.tls else ''}, "
            f"topic root {info.mqtt.topic_root})",
            f"  admin token   {settings.admin_token_file}",
            *(
                [f"  TLS CA        {info.tls.ca} ({info.tls.fingerprint}): give it to devices with --ca"]
                if info.tls
                else []
            ),
            f"  fleet.json    {settings.fleet_json}",
            "Stop with Ctrl+C or SIGTERM.",
        ]
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()

    try:
        asyncio.run(run_server(settings, on_ready=ready))
    except FleetError as exc:
        fail(exc.reason)
    except KeyboardInterrupt:
        pass
    logging.getLogger(__name__).info("fleet stopped")


def _configure_logging(level: str) -> None:
    import logging

    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    quiet = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in ("amqtt", "transitions", "uvicorn.access", "uvicorn.error", "alembic", "httpx"):
        logging.getLogger(name).setLevel(max(quiet, getattr(logging, level)))

"""The fleet's one settings object: flags > environment (SLMOPS_FLEET_*) > defaults."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from slmops_fleet.mqtt_limits import CHUNK_HEADER_ALLOWANCE, DEFAULT_MAX_PACKET
from slmops_protos.links import is_loopback
from slmops_protos.manifests import MAX_FILE_BYTES, MAX_FILES
from slmops_protos.topics import DEFAULT_ROOT

DEFAULT_DATA_DIR = Path("~/.slmops/fleet")
MIN_CHUNK = 256 * 1024
MAX_CHUNK = 1024 * 1024
DEFAULT_CHUNK = 512 * 1024


class BrokerAddress(BaseModel):
    """An external MQTT broker, parsed from mqtt://user:pass@host:port (mqtts://: over TLS, port 8883
    unless given)."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "tcp", "mqtts", "ssl"):
            raise ValueError(f"broker URL must look like mqtts://user:pass@host:port or mqtt://..., got {url!r}")
        if not parts.hostname:
            raise ValueError(f"broker URL has no host: {url!r}")
        tls = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ValueError(f"broker URL has a bad port: {url!r}") from exc
        return cls(
            host=parts.hostname,
            port=port,
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )


class FleetSettings(BaseSettings):
    """Everything the fleet manager can be told. Read once at start-up, never at import time.

    Lists (e.g. `signing_keys`) are given in the environment as JSON: SLMOPS_FLEET_SIGNING_KEYS='["a.pub"]'.
    """

    # `ignore`: SLMOPS_FLEET_URL and SLMOPS_FLEET_TOKEN belong to the CLI, not to the server.
    model_config = SettingsConfigDict(env_prefix="SLMOPS_FLEET_", extra="ignore", validate_default=True)

    data_dir: Path = Field(DEFAULT_DATA_DIR, description="The fleet's data folder (database, blobs, admin token).")
    http_host: str = Field(
        "127.0.0.1", description="Address the HTTP API listens on (0.0.0.0: every interface; needs TLS or --insecure)."
    )
    http_port: int = Field(
        0, ge=0, le=65535, description="HTTP port; 0 picks a free one (and keeps it for this data folder)."
    )
    public_url: str | None = Field(
        None, description="The fleet URL devices are told; default https://host:port (http:// without TLS)."
    )
    tls: bool | None = Field(
        None,
        description="Serve HTTPS and MQTT over TLS. Default: on when a listener is off loopback or --tls-cert is "
        "given, off on loopback only.",
    )
    tls_cert: Path | None = Field(None, description="The operator's server certificate (PEM); default: private CA.")
    tls_key: Path | None = Field(None, description="The key of --tls-cert (PEM).")
    tls_ca: Path | None = Field(None, description="The CA that signed --tls-cert, given to devices (PEM).")
    tls_hosts: list[str] = Field(
        default_factory=list,
        description="More names or addresses the private CA's server certificate carries (it always has the "
        "listen and public hosts, localhost and 127.0.0.1).",
    )
    insecure: bool = Field(
        False, description="Allow plaintext listeners and broker links off loopback (a warning is logged)."
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite in the data folder (postgresql+psycopg://... works)."
    )
    broker_url: str | None = Field(
        None,
        description="External broker mqtts://user:pass@host:port (mqtt:// on loopback); unset: the embedded broker.",
    )
    broker_host: str = Field("127.0.0.1", description="Address the embedded broker listens on.")
    broker_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Embedded broker port; 0 picks a free one (and keeps it for this data folder).",
    )
    broker_ca: Path | None = Field(
        None, description="CA (PEM) of an external mqtts:// broker; the fleet and its devices verify it with it."
    )
    broker_provisioning: Literal["dynsec", "none"] = Field(
        "dynsec",
        description="External broker: create each device's client and ACL with Mosquitto's dynamic security "
        "plugin (dynsec), or leave credentials to the operator (none).",
    )
    broker_admin_url: str | None = Field(
        None, description="Dynamic-security admin mqtt://user:pass@host:port; default: broker_url's credentials."
    )
    public_broker_host: str | None = Field(None, description="Broker host devices are told (default: the real one).")
    public_broker_port: int | None = Field(None, ge=1, le=65535, description="Broker port devices are told.")
    topic_root: str = Field(DEFAULT_ROOT, description="Root of every MQTT topic.")
    chunk_size: int = Field(DEFAULT_CHUNK, description="Bytes per blob chunk (256 KiB to 1 MiB).")
    broadcast_rate: int = Field(
        32 * 1024 * 1024,
        ge=0,
        description="Bytes per second the fleet sends chunks at, all transfers together; 0: no limit.",
    )
    coalesce_window_s: float = Field(
        0.5,
        ge=0,
        le=60,
        description="A broadcast waits this long after the newest request for it, so devices of one wave share it.",
    )
    coalesce_max_s: float = Field(
        5.0,
        ge=0,
        le=600,
        description="A broadcast starts at most this long after its first request, however many more come.",
    )
    max_inflight: int = Field(8, ge=1, le=1000, description="Chunks published but not yet acknowledged by the broker.")
    blob_request_rate: float = Field(
        50.0,
        gt=0,
        description="Blob requests one device may send per second on average (SLMOPS_FLEET_BLOB_REQUEST_RATE); "
        "more are dropped and counted. An agent asks once per blob it fetches, then after stalls.",
    )
    blob_request_burst: int = Field(
        MAX_FILES,
        ge=1,
        description="Blob requests one device may send at once (SLMOPS_FLEET_BLOB_REQUEST_BURST); the default lets "
        "an agent ask for every blob of the largest package a manifest may list at once.",
    )
    signing_keys: list[Path] = Field(
        default_factory=list,
        description="Trusted package signing public keys (hex files as `slmops builder keygen` writes); "
        "<data_dir>/trusted-keys/*.pub are trusted as well.",
    )
    max_blob_bytes: int = Field(MAX_FILE_BYTES, ge=1, description="Largest blob the API accepts.")
    telemetry_max_samples: int = Field(
        10_000,
        ge=1,
        description="Samples one TelemetryBatch may carry (SLMOPS_FLEET_TELEMETRY_MAX_SAMPLES); a batch with more "
        "is refused whole and counted. The default is the most an agent sends in one (its telemetry_batch).",
    )
    telemetry_max_age_s: float = Field(
        30 * 86400,
        ge=0,
        description="Telemetry older than this (by the sample's timestamp) is dropped, counted; 0: no age bound.",
    )
    telemetry_max_rows_per_device: int = Field(
        300_000,
        ge=0,
        description="Telemetry samples kept per device, the newest (the default holds a month at the agent's 10 s "
        "interval); older ones are dropped, counted; 0: no bound.",
    )
    telemetry_retention_interval_s: float = Field(
        300.0, gt=0, le=86400, description="How often telemetry retention runs (in small batches beside ingest)."
    )
    metrics_open: bool = Field(
        False,
        description="Serve /metrics without an admin token (for a scraper on a network you trust); "
        "by default it needs one (a read-only token is enough: Prometheus' `authorization` in a scrape config).",
    )
    mqtt_max_packet_bytes: int = Field(
        DEFAULT_MAX_PACKET,
        ge=MIN_CHUNK + CHUNK_HEADER_ALLOWANCE,
        le=256 * 1024 * 1024,
        description="Largest MQTT packet a client may send to the embedded broker "
        "(SLMOPS_FLEET_MQTT_MAX_PACKET_BYTES); a larger one ends its connection before its body is read, "
        "counted. The default is a little above the largest message a device sends (a 10,000-sample "
        "telemetry batch: 1.9 MB at most) and the fleet's chunks. On Mosquitto, set max_packet_size to "
        "this plus 5 (fleet/deploy/mosquitto.conf).",
    )
    token_default_ttl_s: int = Field(3600, ge=1, description="Enrollment token lifetime when none is asked for.")
    token_max_ttl_s: int = Field(30 * 86400, ge=1, description="Longest enrollment token lifetime allowed.")
    mqtt_keepalive_s: int = Field(30, ge=5, le=3600)
    mqtt_reconnect_max_s: int = Field(30, ge=1, le=3600, description="Cap of the reconnect back-off.")
    rollout_tick_s: float = Field(
        1.0, gt=0, le=60, description="How often the rollout driver checks waves, timeouts, soaks and gates."
    )
    shutdown_grace_s: float = Field(5.0, ge=0, description="Time in-flight HTTP requests get to finish on shutdown.")
    log_level: str = Field("INFO")
    # --- several workers on one database and one external broker (`workers`) ---
    worker_id: str = Field(
        "",
        pattern=r"^[A-Za-z0-9._-]{0,64}$",
        description="This worker's name among the fleet's workers (its MQTT client id is slmops-fleet-<worker id>); "
        "default: derived from the data folder. Workers that share a data folder need one each.",
    )
    share_group: str = Field(
        "slmops-fleet",
        pattern=r"^[A-Za-z0-9._-]{0,64}$",
        description="External broker: device reports, telemetry and credential acks are consumed through the shared "
        "subscription $share/<group>/..., so each goes to one worker; '' subscribes plainly (one worker only).",
    )
    worker_heartbeat_s: float = Field(
        2.0,
        gt=0,
        le=60,
        description="How often a worker renews its presence; one silent for 5 times this is taken as dead and "
        "its broker session drained by another worker.",
    )
    blob_store: Literal["auto", "local", "database"] = Field(
        "auto",
        description="Where uploaded blobs live: 'local' (the data folder), 'database' (PostgreSQL large objects, "
        "which every worker reaches; the data folder caches them), or 'auto': database on PostgreSQL, else local.",
    )
    admin_token_path: Path | None = Field(
        None,
        description="The owner's admin token file (default <data_dir>/admin-token, made at the first start): give "
        "every worker of one fleet the same file, or the same data folder.",
    )

    @field_validator("data_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("signing_keys", mode="after")
    @classmethod
    def _expand_keys(cls, value: list[Path]) -> list[Path]:
        return [p.expanduser().absolute() for p in value]

    @field_validator("tls_cert", "tls_key", "tls_ca", "broker_ca", "admin_token_path", mode="after")
    @classmethod
    def _expand_file(cls, value: Path | None) -> Path | None:
        return value.expanduser().absolute() if value is not None else None

    @field_validator("chunk_size")
    @classmethod
    def _check_chunk(cls, value: int) -> int:
        if not MIN_CHUNK <= value <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be between {MIN_CHUNK} (256 KiB) and {MAX_CHUNK} (1 MiB), got {value}")
        return value

    @field_validator("topic_root")
    @classmethod
    def _check_root(cls, value: str) -> str:
        value = value.strip("/")
        if not value or any(c in value for c in "+#\0") or value.startswith("$"):
            raise ValueError(f"topic_root must be a plain MQTT topic prefix, got {value!r}")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        value = value.upper()
        if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("log_level is one of DEBUG, INFO, WARNING, ERROR")
        return value

    @field_validator("broker_url", "broker_admin_url")
    @classmethod
    def _check_broker_url(cls, value: str | None) -> str | None:
        if value:
            BrokerAddress.parse(value)
        return value or None

    @model_validator(mode="after")
    def _check_ttls(self) -> FleetSettings:
        if self.token_default_ttl_s > self.token_max_ttl_s:
            raise ValueError("token_default_ttl_s is longer than token_max_ttl_s")
        if self.mqtt_max_packet_bytes < self.chunk_size + CHUNK_HEADER_ALLOWANCE:
            raise ValueError(
                f"mqtt_max_packet_bytes ({self.mqtt_max_packet_bytes}) must leave room for the fleet's chunks: "
                f"at least chunk_size + {CHUNK_HEADER_ALLOWANCE} = {self.chunk_size + CHUNK_HEADER_ALLOWANCE}"
            )
        return self

    @model_validator(mode="after")
    def _check_tls(self) -> FleetSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls is False and self.tls_cert is not None:
            raise ValueError("--tls-cert was given with --no-tls")
        if not self.insecure:
            if not self.tls_enabled and self.exposed_hosts():
                raise ValueError(
                    f"plaintext listener on {', '.join(self.exposed_hosts())} (off loopback): drop --no-tls, "
                    "or pass --insecure to allow it"
                )
            for url in (self.broker_url, self.broker_admin_url):
                ext = BrokerAddress.parse(url) if url else None
                if ext is not None and not ext.tls and not is_loopback(ext.host):
                    raise ValueError(
                        f"the broker {ext.host} is off loopback and the URL is not mqtts://: use mqtts://, "
                        "or pass --insecure to allow it"
                    )
        if self.public_url and self.tls_enabled and not self.public_url.startswith("https://"):
            raise ValueError(f"public_url must be https:// when TLS is on, got {self.public_url!r}")
        return self

    # --- derived --------------------------------------------------------------------------------

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url is None

    def exposed_hosts(self) -> list[str]:
        """The listen addresses that are not loopback (HTTP, and the embedded broker's)."""
        hosts = [self.http_host] + ([self.broker_host] if self.embedded_broker else [])
        return sorted({h for h in hosts if not is_loopback(h)})

    @property
    def tls_enabled(self) -> bool:
        """TLS on the fleet's own listeners: as asked, else on when one is off loopback or a certificate is given."""
        if self.tls is not None:
            return self.tls
        return bool(self.exposed_hosts()) or self.tls_cert is not None

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'fleet.db'}"

    @property
    def blobs_in_database(self) -> bool:
        """Blobs in the database's large objects (see `blob_store`)."""
        if self.blob_store == "auto":
            return self.resolved_database_url().startswith("postgresql")
        return self.blob_store == "database"

    def external_broker(self) -> BrokerAddress:
        if self.broker_url is None:
            raise ValueError("no external broker configured")
        return BrokerAddress.parse(self.broker_url)

    def broker_admin(self) -> BrokerAddress:
        return BrokerAddress.parse(self.broker_admin_url or self.broker_url or "")

    @property
    def blobs_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def trusted_keys_dir(self) -> Path:
        return self.data_dir / "trusted-keys"

    @property
    def admin_token_file(self) -> Path:
        return self.admin_token_path or self.data_dir / "admin-token"

    @property
    def mqtt_client_id(self) -> str:
        """The fleet's MQTT client id on an external broker: stable per worker, so its session outlives a
        restart."""
        return "slmops-fleet-" + (self.worker_id or hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12])

    @property
    def fleet_json(self) -> Path:
        return self.data_dir / "fleet.json"

    @property
    def ports_file(self) -> Path:
        return self.data_dir / "ports.json"

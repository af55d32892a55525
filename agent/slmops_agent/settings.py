"""The agent's one settings object: flags > environment (SLMOPS_AGENT_*) > defaults.

A `settings_model.Settings` (not pydantic-settings: an idle agent does not load pydantic).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from slmops_agent.relay import GROUP_S
from slmops_agent.settings_model import Field, Settings, SettingsValidationError

__all__ = ["DEFAULT_STATE_DIR", "AgentSettings", "SettingsValidationError", "free_cores", "load_settings"]

DEFAULT_STATE_DIR = Path("~/.slmops/agent")


def free_cores() -> int:
    """Cores not busy right now (1-minute load average), at least 1.

    With another process busy, asking onnxruntime for every core makes decoding collapse;
    one thread per free core holds up.
    """
    total = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:  # not available on this platform
        busy = 0.0
    return max(1, min(total, int(total - busy + 0.5)))


def _expand(value: Path | None) -> Path | None:
    return None if value is None else value.expanduser().absolute()


def _check_address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {value!r}")
    return value


def _check_level(value: str) -> str:
    value = value.upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("log_level is one of DEBUG, INFO, WARNING, ERROR")
    return value


class AgentSettings(Settings):
    """Everything the agent can be told. Read once at start-up, never at import time."""

    env_prefix = "SLMOPS_AGENT_"

    state_dir: Path = Field(DEFAULT_STATE_DIR, description="The agent's state folder.", check=_expand)
    grpc_socket: Path | None = Field(
        None, description="Unix socket for gRPC; default <state_dir>/agent.sock.", check=_expand
    )
    grpc_address: str = Field(
        "127.0.0.1:50051",
        description="TCP host:port for gRPC; port 0 picks a free one (written to grpc.addr).",
        check=_check_address,
    )
    grpc_tcp: bool = Field(True, description="Listen on grpc_address as well as on the Unix socket.")
    metrics_port: int = Field(
        0,
        ge=-1,
        le=65535,
        description="HTTP port for /metrics and the OpenAI API /v1; 0: a free one (see metrics.addr); -1: off.",
    )
    metrics_host: str = Field("127.0.0.1", description="Address of the HTTP server (loopback by default).")
    tls_cert: Path | None = Field(
        None, description="PEM certificate for gRPC TCP and HTTP (needed off loopback).", check=_expand
    )
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.", check=_expand)
    auth_token: str | None = Field(
        None,
        min_length=16,
        repr=False,
        description="Bearer token callers must send on TCP gRPC and /v1 (needed off loopback).",
    )
    threads: int = Field(default_factory=free_cores, ge=1, le=256, description="onnxruntime intra-op threads.")
    spinning: Literal["auto"] | bool = Field(
        "auto",
        description="Let onnxruntime's threads spin while waiting: much faster decode on idle cores, a "
        "collapse when other processes want them. auto: on when, as a model loads, every thread has a "
        "core that other processes leave free.",
    )
    max_batch: int = Field(
        4,
        ge=1,
        le=64,
        description="Batch slots: concurrent requests decoded together in one batch at most (each slot's KV "
        "cache grows to context_length).",
    )
    context_length: int | None = Field(
        None,
        ge=16,
        le=1 << 20,
        description="Tokens one request may hold (prompt and new tokens), which bounds its KV cache; the "
        "memory it needs is logged when a model loads. Default: the model's, at most 2048. Longer than the "
        "model's: the model is refused.",
    )
    cpu_arena: bool = Field(
        False,
        description="onnxruntime's CPU memory arena: keeps the largest tensors of a burst for the next one "
        "(faster, more memory); off, memory goes back after each run.",
    )
    int4_compute: Literal["int8", "fp32"] = Field(
        "int8",
        description="How int4 MatMuls compute: int8 (activations quantized to int8, as the builder's profiles "
        "ask: fastest) or fp32 (onnxruntime's mlas.qnbit.force_fp32: the weights' prepacked copy takes less "
        "memory, decoding is slower; see benchmarks/README.md, prepack_bench).",
    )
    malloc_arenas: int = Field(
        2,
        ge=0,
        le=1024,
        description="glibc malloc arenas the agent's threads share (0: glibc's default, 8 a core): fewer "
        "keep less memory after a burst of concurrent requests.",
    )
    stream_group_s: float = Field(
        GROUP_S, ge=0, le=1, description="After the first piece, streamed text goes in groups this far apart (0: each)."
    )
    queue_bound: int = Field(16, ge=1, le=10_000, description="Requests waiting or running before RESOURCE_EXHAUSTED.")
    queue_per_client: int = Field(
        8, ge=1, le=10_000, description="Requests one client may have waiting or running before RESOURCE_EXHAUSTED."
    )
    default_max_new_tokens: int = Field(256, ge=1, le=1 << 20)
    max_new_tokens_limit: int = Field(4096, ge=1, le=1 << 20)
    shutdown_grace_s: float = Field(10.0, ge=0, description="Time in-flight streams get to finish on shutdown.")
    telemetry_interval_s: float = Field(10.0, gt=0, description="Seconds between telemetry samples.")
    telemetry_queue_bound: int = Field(100_000, ge=10, description="Samples kept offline; oldest dropped past it.")
    telemetry_batch: int = Field(100, ge=1, le=10_000, description="Samples per TelemetryBatch message.")
    smoke_test_budget_s: float = Field(30.0, gt=0, description="Time TESTING may take to load and run golden prompts.")
    smoke_test_max_new_tokens: int = Field(16, ge=1, le=4096)
    blob_stall_s: float = Field(5.0, gt=0, description="No progress this long: ask for the missing chunks.")
    blob_stall_max_s: float = Field(60.0, gt=0, description="Cap of the repair back-off.")
    blob_stall_gap_factor: float = Field(
        2.0,
        ge=0,
        description="A stall also needs this many times the longest recent gap between chunks without one "
        "(a broker slow to fan a broadcast out is not a stall); 0: blob_stall_s alone.",
    )
    blob_request_max_chunks: int = Field(256, ge=1, le=65_536, description="Chunk indexes per BlobRequest at most.")
    blob_verify_attempts: int = Field(2, ge=1, le=10, description="Fetches of a blob that fails its SHA-256 check.")
    bitmap_flush_s: float = Field(1.0, ge=0, description="Chunk bitmaps are fsynced at most this often.")
    disk_reserve_bytes: int = Field(64 * 1024**2, ge=0, description="Free space kept on top of an update's needs.")
    mqtt_keepalive_s: int = Field(30, ge=5, le=3600)
    mqtt_reconnect_min_s: float = Field(1.0, gt=0)
    mqtt_reconnect_max_s: float = Field(60.0, gt=0)
    mqtt_connect_jitter_s: float = Field(2.0, ge=0, description="Random wait before the first connect.")
    log_level: str = Field("INFO", check=_check_level)
    crash_after_state: str | None = Field(
        None, description="Fault injection for crash tests: SIGKILL the agent right after saving this state."
    )

    def check_all(self) -> None:
        if self.grpc_socket is None:
            self.grpc_socket = self.state_dir / "agent.sock"
        if self.mqtt_reconnect_max_s < self.mqtt_reconnect_min_s:
            raise ValueError("mqtt_reconnect_max_s must be >= mqtt_reconnect_min_s")

    @property
    def socket_path(self) -> Path:
        assert self.grpc_socket is not None
        return self.grpc_socket

    def model_options(self) -> dict[str, Any]:
        """What `runtime.model.load_model` takes from the settings, beside the slot and its model info."""
        return {
            "threads": self.threads,
            "spinning": self.spinning,
            "max_batch": self.max_batch,
            "context_length": self.context_length,
            "cpu_arena": self.cpu_arena,
            "int4_compute": self.int4_compute,
        }


def load_settings(**overrides: object) -> AgentSettings:
    """Settings from the environment with the given flags on top (None means: not given)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return AgentSettings(**given)

"""The fleet's HTTP API (FastAPI). It translates HTTP to `FleetOperations` calls and back; the one
exception handler here maps the fleet's error types to status codes.

Every /v1 endpoint except /v1/enroll and /v1/ca.pem needs `Authorization: Bearer <admin token>`
whose role allows the request (`admin_auth`), or for reads the web console's session cookie
(`console`, served under /ui); /v1/enroll is authorised by its one-time enrollment
token; /healthz and /v1/ca.pem (the fleet's CA certificate, public) are open. The token, its role
and the body's size are checked before the body is read, and admin actions are written to the
audit log (`http_guard.RequestGuard`).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.requests import ClientDisconnect

from slmops_fleet.admin_auth import AdminAuth, Principal
from slmops_fleet.console.routes import add_console
from slmops_fleet.console.sessions import ConsoleSessions, session_cookie
from slmops_fleet.errors import FleetError, InvalidRequest, NotFound, TooLarge
from slmops_fleet.http_groups import add_group_routes
from slmops_fleet.http_guard import RequestGuard, error_response
from slmops_fleet.lifecycle import DeviceLifecycle
from slmops_fleet.metrics import FleetMetrics
from slmops_fleet.operations import FleetOperations
from slmops_protos import __version__
from slmops_protos.key_statements import MAX_STATEMENT_BYTES
from slmops_protos.manifests import MAX_MANIFEST_BYTES

log = logging.getLogger(__name__)

_WRITE_BATCH = 1 << 20


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttl_s: int | None = Field(None, ge=1, description="Lifetime in seconds (default: the fleet's setting).")


class InventoryIn(BaseModel):
    """What the agent reports about its hardware; unknown keys are dropped."""

    model_config = ConfigDict(extra="ignore")
    os: str = Field("", max_length=200)
    arch: str = Field("", max_length=64)
    cpu_count: int = Field(0, ge=0, le=1 << 20)
    memory_bytes: int = Field(0, ge=0)
    disk_free_bytes: int = Field(0, ge=0)
    providers: list[Annotated[str, Field(max_length=100)]] = Field(default_factory=list, max_length=64)
    cpu_features: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=512)
    agent_version: str = Field("", max_length=64)


class EnrollRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(min_length=1, max_length=512)
    public_key: str = Field(description="The device's Ed25519 public key, hex of the raw 32 bytes.")
    name: str = Field("", max_length=200)
    inventory: InventoryIn = Field(default_factory=lambda: InventoryIn.model_validate({}))

    @field_validator("public_key")
    @classmethod
    def _check_key(cls, value: str) -> str:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        value = value.strip().lower()
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(value))
        except ValueError:
            raise ValueError("public_key must be the hex of a raw 32-byte Ed25519 public key") from None
        return value


class GatesIn(BaseModel):
    """What must stay true between waves; a failing gate rolls the rollout back."""

    model_config = ConfigDict(extra="forbid")
    min_success_rate: float | None = Field(None, ge=0, le=1, description="Committed / finished devices.")
    max_failures: int | None = Field(None, ge=0, description="Rolled back or timed out devices tolerated.")
    min_devices: int = Field(1, ge=1, description="Finished devices before the rate gates judge.")
    max_error_rate: float | None = Field(None, ge=0, le=1, description="Inference errors / requests (telemetry).")
    max_p95_ttft_ms: float | None = Field(None, gt=0, description="p95 time to first token (telemetry).")
    min_quality_score: float | None = Field(
        None, ge=0, le=1, description="Golden prompts matching the builder's reference / judged, on the devices."
    )
    min_health_pass_rate: float | None = Field(
        None, ge=0, le=1, description="Devices whose TESTING passed / devices that ran it."
    )


class ReleaseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    version: str = Field(min_length=1, max_length=128)
    package_ids: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        min_length=1, max_length=64, description="Model variants (one per profile) or adapter packages (one per base)."
    )


class RolloutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    package_id: str | None = Field(
        None, min_length=1, max_length=64, description="Package id or a unique prefix (8+ chars)."
    )
    release: str | None = Field(
        None, min_length=1, max_length=330, description="NAME@VERSION or a release id; each device gets its variant."
    )
    target: Literal["all"] | list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        "all", description='"all" enrolled devices or a list of device ids.'
    )
    waves: list[Annotated[str, Field(min_length=1, max_length=1000)]] | None = Field(
        None,
        max_length=100,
        description='Cumulative wave sizes: counts, percents or selectors first, e.g. ["tag=canary", "50%", "100%"].',
    )
    soak_s: float = Field(0.0, ge=0, le=30 * 86400, description="Seconds to wait after a wave before its gates.")
    wave_timeout_s: float | None = Field(
        None, gt=0, le=30 * 86400, description="A device not finished this long after its wave began times out."
    )
    gates: GatesIn | None = None
    selector: str = Field(
        "",
        max_length=1000,
        description='Narrows the target: "tag=canary,arch=x86_64" or "(tag=a OR group=b) AND NOT os=win".',
    )


class TagsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    add: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=32)
    remove: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=32)


class RolloutAction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("", max_length=500)


class AdminTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, description="A unique name (it shows in the audit log).")
    role: str = Field(description="read-only, operator or admin.")


def _principal(request: Request) -> Principal:
    principal = getattr(request.state, "principal", None)
    assert isinstance(principal, Principal), "the guard sets the caller of every admin route"
    return principal


def create_app(
    service: FleetOperations, *, auth: AdminAuth, lifecycle: DeviceLifecycle, metrics: FleetMetrics | None = None
) -> FastAPI:
    app = FastAPI(title="slmops fleet", version=__version__, docs_url="/docs", redoc_url=None)

    # The admin token, its role and body sizes are checked before a route reads the body; admin
    # actions are audited (http_guard).
    # The web console's session cookie also authorises reads (console.sessions).
    sessions = ConsoleSessions(auth)
    app.add_middleware(
        RequestGuard,
        auth=auth,
        audit=service.store,
        session_principal=lambda cookie: sessions.principal(session_cookie(cookie)),
        metrics_open=service.settings.metrics_open,
    )
    add_console(app, sessions, service.store)
    if metrics is not None:
        metrics.install(app)  # GET /metrics, and the latency of every request (outside the guard)

    @app.exception_handler(FleetError)
    async def _fleet_error(_request: Request, exc: FleetError) -> JSONResponse:
        return error_response(exc)

    v1 = APIRouter(prefix="/v1")

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        db = service.store.ping()
        mqtt = service.mqtt_connected()
        ok = db and mqtt
        body = {"status": "ok" if ok else "degraded", "database": db, "mqtt": mqtt, "version": __version__}
        return JSONResponse(body, status_code=200 if ok else 503)

    @v1.post("/tokens")
    def create_token(body: TokenRequest | None = None) -> dict[str, Any]:
        return service.create_token(body.ttl_s if body else None)

    @app.get("/v1/ca.pem")
    def ca_pem() -> PlainTextResponse:
        if not service.fleet_ca_pem:
            raise NotFound("this fleet serves plaintext HTTP: it has no CA")
        return PlainTextResponse(service.fleet_ca_pem, media_type="application/x-pem-file")

    @app.post("/v1/enroll")
    def enroll(body: EnrollRequest, request: Request) -> dict[str, Any]:
        answer = service.enroll(
            token=body.token,
            public_key=body.public_key,
            name=body.name,
            inventory=body.inventory.model_dump(),
            fleet_url=str(request.base_url).rstrip("/"),
        )
        request.state.audit_target = answer["device_id"]
        return answer

    @v1.post("/packages")
    async def upload_package(request: Request) -> dict[str, Any]:
        data = await _read_limited(request, MAX_MANIFEST_BYTES, "signed manifest")
        if not data:
            raise InvalidRequest("empty body: send the bytes of manifest.signed.pb")
        return await asyncio.to_thread(service.add_package, data)

    @v1.get("/packages")
    def list_packages() -> dict[str, Any]:
        return {"packages": service.list_packages()}

    @v1.get("/packages/{ref}")
    def get_package(ref: str) -> dict[str, Any]:
        return service.get_package(ref)

    @v1.get("/signing-keys")
    def signing_keys() -> dict[str, Any]:
        return service.keys.describe()

    @v1.post("/signing-keys/statements")
    async def apply_key_statement(request: Request) -> dict[str, Any]:
        data = await _read_limited(request, MAX_STATEMENT_BYTES, "key statement")
        if not data:
            raise InvalidRequest("empty body: send the bytes of a signed key statement")
        return await asyncio.to_thread(service.keys.apply, data)

    @v1.put("/blobs/{sha256}")
    async def put_blob(sha256: str, request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        try:
            content_length = int(length) if length is not None else None
        except ValueError:
            raise InvalidRequest("bad Content-Length") from None
        writer = await asyncio.to_thread(service.blob_writer, sha256, content_length)
        if writer is None:
            return {"sha256": sha256, "stored": False, "already_present": True}
        buf = bytearray()
        try:
            async for piece in request.stream():
                buf += piece
                if len(buf) >= _WRITE_BATCH:
                    await asyncio.to_thread(writer.write, bytes(buf))
                    buf.clear()
            if buf:
                await asyncio.to_thread(writer.write, bytes(buf))
            await asyncio.to_thread(writer.commit)
        except ClientDisconnect:
            writer.abort()
            raise InvalidRequest("the upload was cut off; nothing kept") from None
        except BaseException:
            writer.abort()
            raise
        return await asyncio.to_thread(service.blob_committed, writer)

    @v1.get("/devices")
    def list_devices() -> dict[str, Any]:
        return {"devices": service.list_devices()}

    @v1.get("/devices/{device_id}")
    def get_device(device_id: str) -> dict[str, Any]:
        return service.get_device(device_id)

    @v1.post("/devices/{device_id}/tags")
    def update_device_tags(device_id: str, body: TagsRequest) -> dict[str, Any]:
        return service.update_device_tags(device_id, body.add, body.remove)

    @v1.post("/devices/{device_id}/revoke")
    def revoke_device(device_id: str, request: Request) -> dict[str, Any]:
        return lifecycle.revoke(device_id, by=_principal(request).name)

    @v1.post("/devices/{device_id}/rotate-credentials")
    def rotate_credentials(device_id: str) -> dict[str, Any]:
        return lifecycle.rotate(device_id)

    @v1.get("/admin-tokens")
    def list_admin_tokens() -> dict[str, Any]:
        return {"tokens": auth.list_tokens()}

    @v1.post("/admin-tokens")
    def create_admin_token(body: AdminTokenRequest, request: Request) -> dict[str, Any]:
        request.state.audit_target = body.name
        return auth.create_token(body.name, body.role, by=_principal(request))

    @v1.post("/admin-tokens/{name}/revoke")
    def revoke_admin_token(name: str, request: Request) -> dict[str, Any]:
        return auth.revoke_token(name, by=_principal(request))

    @v1.get("/audit")
    def audit(
        since: Annotated[datetime | None, Query(description="ISO 8601 time; entries from then on.")] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    ) -> dict[str, Any]:
        if since is not None and since.tzinfo is None:
            raise InvalidRequest("since needs a time zone (e.g. 2026-01-01T00:00:00Z)")
        return {"entries": auth.audit(since, limit)}

    @v1.get("/devices/{device_id}/telemetry")
    def device_telemetry(device_id: str, limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> dict[str, Any]:
        return {"device_id": device_id, "samples": service.device_telemetry(device_id, limit)}

    @v1.get("/telemetry/series")
    def telemetry_series(
        device_id: Annotated[str | None, Query(max_length=64, description="One device (default: the fleet).")] = None,
        since_s: Annotated[float, Query(gt=0, le=30 * 86400, description="Seconds back from now.")] = 3600,
        points: Annotated[int, Query(ge=1, le=2000, description="Buckets at most.")] = 240,
    ) -> dict[str, Any]:
        return service.telemetry_series(device_id, since_s, points)

    @v1.get("/telemetry/latest")
    def telemetry_latest(
        since_s: Annotated[float, Query(gt=0, le=86400, description="Seconds back from now.")] = 300,
    ) -> dict[str, Any]:
        return {"devices": service.telemetry_latest(since_s)}

    @v1.post("/releases")
    def create_release(body: ReleaseRequest) -> dict[str, Any]:
        return service.create_release(body.name, body.version, body.package_ids)

    @v1.get("/releases")
    def list_releases() -> dict[str, Any]:
        return {"releases": service.list_releases()}

    @v1.get("/releases/{ref}")
    def get_release(ref: str) -> dict[str, Any]:
        return service.get_release(ref)

    @v1.post("/rollouts")
    def create_rollout(body: RolloutRequest) -> dict[str, Any]:
        return service.create_rollout(
            body.package_id,
            body.target,
            release=body.release,
            waves=body.waves,
            soak_s=body.soak_s,
            wave_timeout_s=body.wave_timeout_s,
            gates=body.gates.model_dump() if body.gates else None,
            selector=body.selector,
        )

    @v1.get("/rollouts")
    def list_rollouts() -> dict[str, Any]:
        return {"rollouts": service.list_rollouts()}

    @v1.get("/rollouts/{rollout_id}")
    def get_rollout(rollout_id: str) -> dict[str, Any]:
        return service.get_rollout(rollout_id)

    @v1.get("/rollouts/{rollout_id}/explain")
    def explain_rollout(rollout_id: str, device: str | None = None) -> dict[str, Any]:
        return service.explain_rollout(rollout_id, device)

    @v1.post("/rollouts/{rollout_id}/rollback")
    def rollback_rollout(rollout_id: str) -> dict[str, Any]:
        return service.rollback_rollout(rollout_id)

    @v1.post("/rollouts/{rollout_id}/{action}")
    def control_rollout(
        rollout_id: str, action: Literal["pause", "resume", "cancel"], body: RolloutAction | None = None
    ) -> dict[str, Any]:
        return service.control_rollout(rollout_id, action, body.reason if body else "")

    @v1.get("/stats")
    def stats() -> dict[str, Any]:
        return service.stats()

    @v1.get("/status")
    def status() -> dict[str, Any]:
        return service.status()

    add_group_routes(v1, service)
    app.include_router(v1)
    return app


async def _read_limited(request: Request, limit: int, what: str) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise TooLarge(f"{what} is {length} bytes (limit {limit})")
    data = bytearray()
    try:
        async for piece in request.stream():
            data += piece
            if len(data) > limit:
                raise TooLarge(f"{what} is over {limit} bytes")
    except ClientDisconnect:
        raise InvalidRequest(f"the {what} upload was cut off") from None
    return bytes(data)

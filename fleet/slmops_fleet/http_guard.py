"""The HTTP API's gate: the admin token, its role and the size of a request body are checked before
any of the body is read, and every admin action is written to the audit log.

FastAPI reads and parses a JSON body before it runs a route's dependencies, so an anonymous client
could make the fleet hold and parse hundreds of megabytes before it was told its token was wrong.
This pure ASGI middleware runs first:

- every /v1 path except /v1/enroll and /v1/ca.pem (public: the CA a device checks against the
  fingerprint it was given), and /metrics unless the fleet serves it open (`metrics_open`), needs
  `Authorization: Bearer <admin token>` (the owner's or a named one, `admin_auth`): anything else
  is answered 401 at once, the body unread;
- a GET or HEAD with no Authorization header may instead carry the web console's session cookie
  (`session_principal`, from `console.sessions`): reads only, so the cookie never changes anything;
- a token whose role may not make the request (a read-only token writing) is answered 403 at once;
- every request that may change something (not GET/HEAD) by a known token, and every successful
  enrollment, is written to the audit log after it is answered: who (token name and role, client
  address), what (method, path, target), when, and the status it got. A route names its target in
  `request.state.audit_target` (else it is the id in the path); the caller is in
  `request.state.principal`;
- a body over its route's limit is answered 413: at once when Content-Length says so, or as soon as
  the bytes received pass the limit (a chunked upload), and the app then sees the client gone.

Routes that stream their bodies under limits of their own (blob uploads, signed manifests) are
not capped here; every other body is JSON and capped at `MAX_JSON_BYTES`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

from fastapi.responses import JSONResponse

from slmops_fleet.admin_auth import READ_METHODS, AdminAuth, Principal, refusal
from slmops_fleet.errors import FleetError, Forbidden, InvalidRequest, TooLarge, Unauthorized

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

# The largest JSON body any route takes (a rollout naming ~10,000 devices is well under it).
MAX_JSON_BYTES = 1 << 20
ENROLL_PATH = "/v1/enroll"
OPEN_PATHS = frozenset({"/healthz", ENROLL_PATH, "/v1/ca.pem"})
METRICS_PATH = "/metrics"
# Routes that read their bodies as streams, each under its own limit (no cap here).
_STREAMED = re.compile(r"^/v1/(blobs/[^/]+|packages)$")


def error_response(exc: FleetError) -> JSONResponse:
    """The one JSON answer for a fleet error: `{"detail": reason}` with its status code."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    return JSONResponse({"detail": exc.reason}, status_code=exc.status_code, headers=headers)


class AuditLog(Protocol):
    def add_audit(
        self, *, actor: str, role: str, client: str, method: str, path: str, target: str, status: int
    ) -> None: ...


def path_target(path: str) -> str:
    """The id a /v1/<things>/<id>/... path names ("" if none)."""
    parts = path.split("/")
    return parts[3] if len(parts) > 3 and parts[1] == "v1" else ""


class RequestGuard:
    def __init__(
        self,
        app: App,
        *,
        auth: AdminAuth,
        audit: AuditLog | None = None,
        session_principal: Callable[[str | None], Principal | None] | None = None,
        metrics_open: bool = False,
    ) -> None:
        self.app = app
        self.auth = auth
        self.audit = audit
        self.session_principal = session_principal  # Cookie header -> the console session's principal
        self.metrics_open = metrics_open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        method: str = scope["method"].upper()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        state: dict[str, Any] = scope.setdefault("state", {})
        principal: Principal | None = None
        if (path.startswith("/v1/") and path not in OPEN_PATHS) or (path == METRICS_PATH and not self.metrics_open):
            principal = await asyncio.to_thread(self.auth.identify, headers.get("authorization"))
            by_cookie = self.session_principal
            if principal is None and by_cookie and method in READ_METHODS and "authorization" not in headers:
                principal = await asyncio.to_thread(by_cookie, headers.get("cookie"))
            if principal is None:
                reason = "missing, unknown or revoked admin token (Authorization: Bearer <token>)"
                await error_response(Unauthorized(reason))(scope, receive, send)
                return
            state["principal"] = principal
            why = refusal(principal, method, path)
            if why:
                await error_response(Forbidden(why))(scope, receive, send)
                await self._record(scope, principal, 403)
                return
        audited = (principal is not None and method not in READ_METHODS) or (path == ENROLL_PATH and method == "POST")
        status = [500]

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self._checked(scope, receive, observed if audited else send, headers)
        finally:
            if audited and (principal is not None or status[0] == 200):
                await self._record(scope, principal, status[0])

    async def _checked(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        if _STREAMED.match(scope["path"]):
            await self.app(scope, receive, send)
            return
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            await error_response(InvalidRequest("bad Content-Length"))(scope, receive, send)
            return
        if length is not None and int(length) > MAX_JSON_BYTES:
            await error_response(TooLarge(f"a body of {length} bytes (limit {MAX_JSON_BYTES})"))(scope, receive, send)
            return
        await self._capped(scope, receive, send)

    async def _record(self, scope: Scope, principal: Principal | None, status: int) -> None:
        """One audit entry; a failure to write it is logged, never the request's failure."""
        if self.audit is None:
            return
        state = scope.get("state") or {}
        client = scope.get("client")
        try:
            await asyncio.to_thread(
                self.audit.add_audit,
                actor=principal.name if principal else "enrollment",
                role=principal.role.value if principal else "device",
                client=str(client[0]) if client else "",
                method=scope["method"].upper(),
                path=scope["path"],
                target=str(state.get("audit_target") or path_target(scope["path"])),
                status=status,
            )
        except Exception:
            log.exception("could not write the audit entry of %s %s", scope["method"], scope["path"])

    async def _capped(self, scope: Scope, receive: Receive, send: Send) -> None:
        seen = 0
        refused = False
        started = False

        async def counted() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_JSON_BYTES:
                    refused = True
                    if not started:
                        await error_response(TooLarge(f"a body over {MAX_JSON_BYTES} bytes"))(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def answer(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out; what the app says after it has no one to go to
            started = True
            await send(message)

        await self.app(scope, counted, answer)

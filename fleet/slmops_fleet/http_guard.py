"""The HTTP API's gate: the admin token and the size of a request body are checked before any of the
body is read.

FastAPI reads and parses a JSON body before it runs a route's dependencies, so an anonymous client
could make the fleet hold and parse hundreds of megabytes before it was told its token was wrong.
This pure ASGI middleware runs first:

- every /v1 path except /v1/enroll and /v1/ca.pem (public: the CA a device checks against the
  fingerprint it was given) needs `Authorization: Bearer <admin token>`: anything else is
  answered 401 at once, the body unread;
- a body over its route's limit is answered 413: at once when Content-Length says so, or as soon as
  the bytes received pass the limit (a chunked upload), and the app then sees the client gone.

Routes that stream their bodies under limits of their own (blob uploads, signed manifests) are
not capped here; every other body is JSON and capped at `MAX_JSON_BYTES`.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.responses import JSONResponse

from slmops_fleet.errors import FleetError, InvalidRequest, TooLarge, Unauthorized

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

# The largest JSON body any route takes (a rollout naming ~10,000 devices is well under it).
MAX_JSON_BYTES = 1 << 20
OPEN_PATHS = frozenset({"/healthz", "/v1/enroll", "/v1/ca.pem"})
# Routes that read their bodies as streams, each under its own limit (no cap here).
_STREAMED = re.compile(r"^/v1/(blobs/[^/]+|packages)$")


def error_response(exc: FleetError) -> JSONResponse:
    """The one JSON answer for a fleet error: `{"detail": reason}` with its status code."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    return JSONResponse({"detail": exc.reason}, status_code=exc.status_code, headers=headers)


def bearer_matches(authorization: str | None, token: str) -> bool:
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


class RequestGuard:
    def __init__(self, app: App, *, admin_token: str) -> None:
        self.app = app
        self.admin_token = admin_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        admin_path = path.startswith("/v1/") and path not in OPEN_PATHS
        if admin_path and not bearer_matches(headers.get("authorization"), self.admin_token):
            reason = "missing or wrong admin token (Authorization: Bearer <token>)"
            await error_response(Unauthorized(reason))(scope, receive, send)
            return
        if _STREAMED.match(path):
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

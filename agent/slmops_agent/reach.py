"""Reach beyond loopback: TLS and a bearer token, required whenever a server binds a non-loopback address.

The gRPC side checks the token in a server interceptor on every call except the health service (and
calls over the Unix socket, which its file permissions guard); the HTTP side checks it for /v1/*.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from slmops_agent.errors import AgentError

HEALTH_PREFIX = "/grpc.health.v1.Health/"
AUTH_HEADER = "authorization"


@dataclass(frozen=True)
class TlsFiles:
    """A PEM certificate (chain) and its private key, read at start-up."""

    cert: bytes
    key: bytes
    cert_path: Path
    key_path: Path

    @classmethod
    def load(cls, cert: Path, key: Path) -> TlsFiles:
        try:
            cert_bytes, key_bytes = cert.read_bytes(), key.read_bytes()
        except OSError as exc:
            raise AgentError(f"cannot read the TLS files: {exc.filename}: {exc.strerror}") from exc
        if b"-----BEGIN" not in cert_bytes or b"-----BEGIN" not in key_bytes:
            raise AgentError(f"the TLS certificate {cert} and key {key} must be PEM files")
        return cls(cert=cert_bytes, key=key_bytes, cert_path=cert, key_path=key)


def tls_from(cert: Path | None, key: Path | None) -> TlsFiles | None:
    """The TLS files when both are set; one without the other is an error."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise AgentError("TLS needs both a certificate and a key (SLMOPS_AGENT_TLS_CERT and SLMOPS_AGENT_TLS_KEY)")
    return TlsFiles.load(cert, key)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1); "" and 0.0.0.0 are not."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def require_protection(what: str, host: str, tls: TlsFiles | None, token: str | None) -> None:
    """Refuse to serve `what` on a non-loopback `host` without TLS and a bearer token."""
    address = host
    if is_loopback(host):
        return
    missing = []
    if tls is None:
        missing.append("TLS (SLMOPS_AGENT_TLS_CERT and SLMOPS_AGENT_TLS_KEY)")
    if not token:
        missing.append("a bearer token (SLMOPS_AGENT_AUTH_TOKEN)")
    if missing:
        raise AgentError(
            f"{what} on {address} is reachable beyond this machine and needs {' and '.join(missing)}; "
            "set them or bind a loopback address"
        )


def token_matches(header: str | None, token: str) -> bool:
    """Constant-time check of an `authorization: Bearer <token>` value."""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


def auth_interceptor(token: str) -> Any:
    """A grpc.aio server interceptor: UNAUTHENTICATED unless the call carries `authorization: Bearer <token>`.

    Health checks pass without it, and so do calls over the Unix socket (peer "unix:...")."""

    class AuthInterceptor(grpc.aio.ServerInterceptor):
        async def intercept_service(
            self,
            continuation: Callable[[Any], Awaitable[Any]],
            handler_call_details: Any,
        ) -> Any:
            handler = await continuation(handler_call_details)
            method = getattr(handler_call_details, "method", "") or ""
            if handler is None or method.startswith(HEALTH_PREFIX):
                return handler
            metadata = dict(handler_call_details.invocation_metadata or ())
            if token_matches(metadata.get(AUTH_HEADER), token):
                return handler
            return _guarded(handler, "authorization" in metadata)

    def _guarded(handler: Any, had_header: bool) -> Any:
        message = "wrong bearer token" if had_header else "a bearer token is required (authorization: Bearer ...)"

        def allowed(context: Any) -> bool:
            return str(context.peer()).startswith("unix:")

        kw = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary(request: Any, context: Any) -> Any:
                if not allowed(context):
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, **kw)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                if not allowed(context):
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
                async for item in inner_us(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
        if handler.stream_stream is not None:  # reflection
            inner_ss = handler.stream_stream

            async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
                if not allowed(context):
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
                async for item in inner_ss(requests, context):
                    yield item

            return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: Any) -> Any:
            if not allowed(context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            return await inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)

    return AuthInterceptor()

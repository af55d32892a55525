"""Client helpers for the agent's gRPC API, shared by `slmops agent ask`, the demo and the benchmarks."""

from __future__ import annotations

from typing import Any


def channel_options() -> list[tuple[str, int]]:
    """The client channel options for the agent: a streamed Generate is read on the calling thread
    (grpcio's SingleThreadedUnaryStream) instead of through grpc's background thread, one thread hop
    less per message, so the first piece reaches the client sooner (benchmarks/README.md)."""
    import grpc.experimental

    return [(grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]


def open_channel(target: str, root_certificates: bytes | None = None) -> Any:
    """A gRPC channel to the agent at `target`: TLS trusting `root_certificates` (PEM) when given,
    plain otherwise."""
    import grpc

    if root_certificates is None:
        return grpc.insecure_channel(target, options=channel_options())
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    return grpc.secure_channel(target, credentials, options=channel_options())


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries a bearer token (none without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()

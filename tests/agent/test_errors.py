"""One mapping from the agent's errors to status codes (`errors.status_name`, used by gRPC and HTTP)."""

from __future__ import annotations

import pytest

from slmops_agent.errors import (
    Cancelled,
    InvalidRequest,
    ModelLoadError,
    NoModelLoaded,
    NotFound,
    PackageRejected,
    QueueFull,
    status_name,
)


@pytest.mark.parametrize(
    ("exc", "name"),
    [
        (InvalidRequest("x"), "INVALID_ARGUMENT"),
        (NotFound("x"), "NOT_FOUND"),
        (QueueFull("x"), "RESOURCE_EXHAUSTED"),
        (NoModelLoaded("x"), "UNAVAILABLE"),
        (ModelLoadError("x"), "UNAVAILABLE"),
        (Cancelled("x"), "CANCELLED"),
        (TimeoutError(), "DEADLINE_EXCEEDED"),
        (PackageRejected("x"), "FAILED_PRECONDITION"),
        (ZeroDivisionError(), "INTERNAL"),
    ],
)
def test_one_mapping_from_errors_to_status_codes(exc: BaseException, name: str) -> None:
    import grpc

    from slmops_agent.server import status_for

    assert status_name(exc) == name
    code, message = status_for(exc)
    assert code is grpc.StatusCode[name]
    assert message == (str(exc) if name != "INTERNAL" else "internal error: ZeroDivisionError: ")

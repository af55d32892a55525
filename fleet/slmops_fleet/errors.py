"""The fleet's own error types. `http_guard.error_response` turns them into HTTP answers in one place."""

from __future__ import annotations


class FleetError(Exception):
    """Base of every error the fleet raises on purpose; `reason` is one line for the operator."""

    status_code = 500

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidRequest(FleetError):
    """Malformed or unacceptable input (400)."""

    status_code = 400


class EnrollmentRefused(FleetError):
    """An enrollment token is unknown, expired or already used (401)."""

    status_code = 401


class Unauthorized(FleetError):
    """A missing or wrong admin token (401)."""

    status_code = 401


class Forbidden(FleetError):
    """The caller is known but may not do this: a read-only token writing, a revoked device (403)."""

    status_code = 403


class NotFound(FleetError):
    """No such package, device, rollout or blob (404)."""

    status_code = 404


class Conflict(FleetError):
    """The request clashes with the fleet's state, e.g. a rollout of an incomplete package (409)."""

    status_code = 409


class TooLarge(FleetError):
    """A body is over its size limit (413)."""

    status_code = 413


class Unavailable(FleetError):
    """A dependency (the broker's provisioning API) is not reachable right now (503)."""

    status_code = 503


class StartupError(FleetError):
    """The fleet cannot start (a port is taken, a key file is bad); the message says how to fix it."""


class ProvisioningError(FleetError):
    """The broker refused or did not answer a credentials/ACL command."""

    status_code = 503

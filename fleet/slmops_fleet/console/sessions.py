"""The console's sign-in: a pasted admin token becomes a server-side session.

The browser holds only a random session id, in an HttpOnly, SameSite=Strict cookie; the token stays
in this process's memory and is checked again (`AdminAuth.identify`) on every use, so a token revoked
while its session is open stops working at once. A session lasts `ttl_s` from sign-in; the oldest is
dropped when `max_sessions` are open. The cookie authorises reads only (`http_guard.RequestGuard`
takes it for GET and HEAD of /v1): nothing a page's script or another site can send with it changes
the fleet, which also closes cross-site request forgery.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from slmops_fleet.admin_auth import AdminAuth, Principal

COOKIE = "slmops_console"
DEFAULT_TTL_S = 8 * 3600
MAX_SESSIONS = 1000


@dataclass(frozen=True)
class _Session:
    token: str
    expires: float


class ConsoleSessions:
    def __init__(self, auth: AdminAuth, *, ttl_s: float = DEFAULT_TTL_S, max_sessions: int = MAX_SESSIONS) -> None:
        self.auth = auth
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._lock = threading.Lock()

    def sign_in(self, token: str) -> tuple[str, Principal] | None:
        """A new session id and its principal, or None for a wrong, revoked or malformed token.
        Queries the store: call it off the event loop."""
        token = token.strip()
        if not token or any(c.isspace() for c in token):
            return None
        principal = self.auth.identify(f"Bearer {token}")
        if principal is None:
            return None
        session_id = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[session_id] = _Session(token, time.monotonic() + self.ttl_s)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return session_id, principal

    def principal(self, session_id: str | None) -> Principal | None:
        """Who an open session belongs to (None: unknown, expired, or its token revoked). Queries the
        store: call it off the event loop."""
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.expires <= time.monotonic():
                del self._sessions[session_id]
                session = None
        if session is None:
            return None
        principal = self.auth.identify(f"Bearer {session.token}")
        if principal is None:
            self.sign_out(session_id)
        return principal

    def sign_out(self, session_id: str | None) -> None:
        with self._lock:
            self._sessions.pop(session_id or "", None)


def session_cookie(cookie_header: str | None) -> str | None:
    """The console's session id in a Cookie header, if any."""
    for part in (cookie_header or "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name == COOKIE and value:
            return value
    return None

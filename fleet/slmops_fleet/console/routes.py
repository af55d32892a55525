"""The console's pages: a sign-in form, and one HTML skeleton per page whose script (static/console.js)
polls the JSON API with the session cookie. Every page but the sign-in needs an open session;
without one it redirects to the sign-in. Nothing here writes a token into a page, a URL or a
response: the cookie holds a random session id only (`sessions`).

A sign-in posted from another site (its Origin is not the fleet's) is refused, and every sign-in,
good or wrong, is written to the audit log.

Pages: /ui/devices, /ui/devices/{id}, /ui/groups, /ui/rollouts, /ui/rollouts/{id}, /ui/releases,
/ui/releases/{id}, /ui/fleet (fleet-wide plots).
"""

from __future__ import annotations

import asyncio
from html import escape
from importlib.resources import files
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from slmops_fleet.admin_auth import Principal
from slmops_fleet.console.sessions import COOKIE, ConsoleSessions, session_cookie
from slmops_fleet.http_guard import AuditLog

PREFIX = "/ui"
LOGIN = f"{PREFIX}/login"
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "Cache-Control": "no-store",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}
_NAV = (
    ("devices", "Devices"),
    ("groups", "Groups"),
    ("rollouts", "Rollouts"),
    ("releases", "Releases"),
    ("fleet", "Fleet"),
)
_HEAD = (
    '<!doctype html><html lang="en"><head><meta charset="utf-8">'
    '<meta name="viewport" content="width=device-width, initial-scale=1">'
    '<link rel="icon" href="data:,"><title>{title} · slmops fleet</title>'
    f'<link rel="stylesheet" href="{PREFIX}/static/uPlot.min.css">'
    f'<link rel="stylesheet" href="{PREFIX}/static/console.css"></head>'
)


def _html(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers=_HEADERS)


def login_page(error: str = "", status: int = 200) -> HTMLResponse:
    message = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    return _html(
        _HEAD.format(title="Sign in") + '<body class="login"><form method="post" action="/ui/login" autocomplete="off">'
        "<h1>slmops fleet</h1><p>Paste an admin token (read-only is enough to look).</p>"
        f"{message}"
        '<label for="token">Admin token</label>'
        '<input id="token" name="token" type="password" required maxlength="512" autofocus>'
        '<button type="submit">Sign in</button></form></body></html>',
        status,
    )


def shell(page: str, title: str, principal: Principal) -> HTMLResponse:
    nav = "".join(
        f'<a href="{PREFIX}/{name}"{" class=active" if page.startswith(name[:-1]) else ""}>{label}</a>'
        for name, label in _NAV
    )
    return _html(
        _HEAD.format(title=escape(title)) + f'<body><header><span class="brand">slmops fleet</span><nav>{nav}</nav>'
        f'<span class="who">{escape(principal.name)} ({escape(principal.role.value)})</span>'
        f'<form method="post" action="{PREFIX}/logout"><button type="submit">Sign out</button></form>'
        f'</header><div id="error" role="alert" hidden></div><main id="app" data-page="{escape(page)}"></main>'
        f'<script src="{PREFIX}/static/uPlot.iife.min.js"></script>'
        f'<script src="{PREFIX}/static/console.js"></script></body></html>'
    )


def add_console(app: FastAPI, sessions: ConsoleSessions, audit: AuditLog) -> None:
    """Serve the console under /ui on `app`, its sessions in `sessions`; sign-ins (good and wrong)
    go to the audit log."""
    router = APIRouter(prefix=PREFIX, include_in_schema=False)

    async def record(request: Request, principal: Principal | None, status: int) -> None:
        await asyncio.to_thread(
            audit.add_audit,
            actor=principal.name if principal else "unknown",
            role=principal.role.value if principal else "",
            client=request.client.host if request.client else "",
            method="POST",
            path=LOGIN,
            target="console",
            status=status,
        )

    async def signed_in(request: Request) -> Principal | None:
        return await asyncio.to_thread(sessions.principal, session_cookie(request.headers.get("cookie")))

    async def page(request: Request, name: str, title: str) -> Response:
        principal = await signed_in(request)
        if principal is None:
            return RedirectResponse(LOGIN, status_code=303, headers=_HEADERS)
        return shell(name, title, principal)

    @router.get("")
    @router.get("/")
    async def home() -> Response:
        return RedirectResponse(f"{PREFIX}/devices", status_code=303, headers=_HEADERS)

    @router.get("/login")
    async def login_form(request: Request) -> Response:
        if await signed_in(request) is not None:
            return RedirectResponse(f"{PREFIX}/devices", status_code=303, headers=_HEADERS)
        return login_page()

    @router.post("/login")
    async def login(request: Request) -> Response:
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            return login_page("Sign in from the fleet's own page.", 403)  # another site posting a sign-in
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            return login_page("Send the sign-in form.", 400)
        form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=4)
        tokens = form.get("token", [])
        found = await asyncio.to_thread(sessions.sign_in, tokens[0]) if len(tokens) == 1 else None
        if found is None:
            await record(request, None, 401)
            return login_page("Wrong, revoked or malformed token.", 401)
        session_id, principal = found
        await record(request, principal, 303)
        answer = RedirectResponse(f"{PREFIX}/devices", status_code=303, headers=_HEADERS)
        answer.set_cookie(
            COOKIE,
            session_id,
            max_age=int(sessions.ttl_s),
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return answer

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        sessions.sign_out(session_cookie(request.headers.get("cookie")))
        answer = RedirectResponse(LOGIN, status_code=303, headers=_HEADERS)
        answer.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return answer

    @router.get("/devices")
    async def devices(request: Request) -> Response:
        return await page(request, "devices", "Devices")

    @router.get("/devices/{device_id}")
    async def device(request: Request, device_id: str) -> Response:
        return await page(request, "device", "Device")

    @router.get("/groups")
    async def groups(request: Request) -> Response:
        return await page(request, "groups", "Groups")

    @router.get("/rollouts")
    async def rollouts(request: Request) -> Response:
        return await page(request, "rollouts", "Rollouts")

    @router.get("/rollouts/{rollout_id}")
    async def rollout(request: Request, rollout_id: str) -> Response:
        return await page(request, "rollout", "Rollout")

    @router.get("/releases")
    async def releases(request: Request) -> Response:
        return await page(request, "releases", "Releases")

    @router.get("/releases/{ref}")
    async def release(request: Request, ref: str) -> Response:
        return await page(request, "release", "Release")

    @router.get("/fleet")
    async def fleet(request: Request) -> Response:
        return await page(request, "fleet", "Fleet")

    app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=str(files("slmops_fleet.console") / "static")), name="console")

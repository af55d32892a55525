"""The HTTP client of the fleet's API, as the CLI (and tests, and the demo) use it.

Every failure is a `FleetClientError` with a one-line message meant for an operator.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_DATA_DIR = "~/.slmops/fleet"
_UPLOAD_PIECE = 1 << 20


class FleetClientError(Exception):
    """A command against the fleet failed; str(exc) is one line for the operator."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class FleetTarget:
    url: str
    token: str
    source: str  # where the token came from, for error messages
    ca: str | None = None  # the CA file an https:// fleet is verified with (None: the system's CAs)


def default_data_dir() -> Path:
    return Path(os.environ.get("SLMOPS_FLEET_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()


def resolve_target(fleet: str | None, token: str | None, data_dir: Path | None) -> FleetTarget:
    """--fleet/--token, else SLMOPS_FLEET_URL/SLMOPS_FLEET_TOKEN, else <data dir>/fleet.json. The CA of an
    https:// fleet: SLMOPS_FLEET_CA, else fleet.json's (the fleet's own CA when it is the same fleet)."""
    url = fleet or os.environ.get("SLMOPS_FLEET_URL") or None
    tok = token or os.environ.get("SLMOPS_FLEET_TOKEN") or None
    ca = os.environ.get("SLMOPS_FLEET_CA") or None
    token_source = "--token" if token else "SLMOPS_FLEET_TOKEN"
    ddir = (data_dir or default_data_dir()).expanduser()
    info_path = ddir / "fleet.json"
    info: dict[str, Any] = {}
    if info_path.is_file() and not (url and tok and ca):
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError) as exc:
            if not (url and tok):  # fleet.json was only asked for the CA: go without it
                raise FleetClientError(f"cannot read {info_path}: {exc}") from exc
    if not url:
        if not info.get("url"):
            raise FleetClientError(
                f"no running fleet found: {info_path} does not exist (is `slmops fleet serve` running with "
                "this --data-dir?); or pass --fleet URL --token TOKEN"
            )
        url = str(info["url"])
    if not tok:
        if info.get("admin_token") and str(info.get("url", "")).rstrip("/") == url.rstrip("/"):
            tok, token_source = str(info["admin_token"]), str(info_path)
        else:
            token_file = ddir / "admin-token"
            if token_file.is_file():
                tok, token_source = token_file.read_text().strip() or None, str(token_file)
        if not tok:
            raise FleetClientError(f"no admin token for {url}: pass --token or set SLMOPS_FLEET_TOKEN")
    if not ca and info.get("ca_file") and str(info.get("url", "")).rstrip("/") == url.rstrip("/"):
        ca = str(info["ca_file"])
    return FleetTarget(url.rstrip("/"), tok, token_source, ca)


class FleetClient:
    def __init__(self, url: str, token: str, *, timeout: float = 30.0, source: str = "", ca: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.source = source
        verify: ssl.SSLContext | bool = True
        if ca:
            try:
                verify = ssl.create_default_context(cafile=ca)
            except (OSError, ssl.SSLError) as exc:
                raise FleetClientError(f"cannot read the fleet's CA certificate {ca}: {exc}") from None
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout),
            verify=verify,
        )

    @classmethod
    def from_target(cls, target: FleetTarget, *, timeout: float = 30.0) -> FleetClient:
        return cls(target.url, target.token, timeout=timeout, source=target.source, ca=target.ca)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- plumbing -------------------------------------------------------------------------------

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except (httpx.ReadError, httpx.RemoteProtocolError):
            if method != "GET":
                raise
            # A kept-alive connection that the fleet closed as this request went out (a busy fleet
            # does): a GET changes nothing, so it goes once more, on a new one.
            return self._http.request(method, path, **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._send(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise FleetClientError(
                    f"the fleet at {self.url} is not verified by the CA given ({_first_line(exc)}); set "
                    "SLMOPS_FLEET_CA to the fleet's CA file (<data dir>/tls/ca.pem)"
                ) from exc
            raise FleetClientError(
                f"the fleet is not running at {self.url} (cannot connect: {_first_line(exc)}); "
                "start it with `slmops fleet serve`"
            ) from exc
        except httpx.TimeoutException as exc:
            raise FleetClientError(f"the fleet at {self.url} did not answer in time ({_first_line(exc)})") from exc
        except httpx.HTTPError as exc:
            raise FleetClientError(f"talking to the fleet at {self.url} failed: {_first_line(exc)}") from exc
        if response.status_code == 401:
            where = f" (token from {self.source})" if self.source else ""
            raise FleetClientError(
                f"the fleet at {self.url} refused the admin token{where}: {_detail(response)}", status_code=401
            )
        if response.status_code >= 400:
            raise FleetClientError(_detail(response), status_code=response.status_code)
        try:
            return response.json()
        except ValueError as exc:
            raise FleetClientError(f"the fleet answered {path} with something that is not JSON") from exc

    # --- API ------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        try:
            response = self._http.get("/healthz")
        except httpx.HTTPError as exc:
            raise FleetClientError(f"the fleet is not running at {self.url} ({_first_line(exc)})") from exc
        data: dict[str, Any] = response.json()
        return data

    def create_token(self, ttl_s: int | None = None) -> dict[str, Any]:
        return dict(self.request("POST", "/v1/tokens", json={"ttl_s": ttl_s} if ttl_s else {}))

    def list_packages(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/packages")["packages"])

    def get_package(self, ref: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/packages/{ref}"))

    def add_package(self, signed_manifest: bytes) -> dict[str, Any]:
        return dict(
            self.request(
                "POST",
                "/v1/packages",
                content=signed_manifest,
                headers={"Content-Type": "application/octet-stream"},
            )
        )

    def signing_keys(self) -> dict[str, Any]:
        return dict(self.request("GET", "/v1/signing-keys"))

    def apply_key_statement(self, statement: bytes) -> dict[str, Any]:
        return dict(
            self.request(
                "POST",
                "/v1/signing-keys/statements",
                content=statement,
                headers={"Content-Type": "application/octet-stream"},
            )
        )

    def put_blob(self, sha256: str, path: Path, on_bytes: Callable[[int], None] | None = None) -> dict[str, Any]:
        size = path.stat().st_size

        def body() -> Iterator[bytes]:
            with path.open("rb") as f:
                while piece := f.read(_UPLOAD_PIECE):
                    if on_bytes is not None:
                        on_bytes(len(piece))
                    yield piece

        return dict(
            self.request(
                "PUT",
                f"/v1/blobs/{sha256}",
                content=body(),
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                timeout=httpx.Timeout(30.0, read=600.0, write=600.0),
            )
        )

    def upload_package(
        self,
        folder: Path,
        *,
        on_start: Callable[[int, int], None] | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Upload a package folder: its signed manifest, then only the blobs the fleet lacks.
        `on_start(blobs, bytes)` is called once with what will be sent."""
        from slmops_protos.manifests import SIGNED_MANIFEST_FILE, PackageError, read_package

        if not folder.exists():
            raise FleetClientError(f"package folder not found: {folder}")
        if not folder.is_dir():
            raise FleetClientError(f"{folder} is not a folder (give the package folder the builder wrote)")
        try:
            _signed, blob_dir = read_package(folder)
        except PackageError as exc:
            raise FleetClientError(exc.reason) from exc
        result = self.add_package((folder / SIGNED_MANIFEST_FILE).read_bytes())
        missing: list[str] = list(result.get("missing_blobs", []))
        paths = []
        for sha in missing:
            p = blob_dir / sha
            if not p.is_file():
                raise FleetClientError(f"the package folder lacks blob {sha} (expected {p}); rebuild the package")
            paths.append(p)
        total = sum(p.stat().st_size for p in paths)
        if on_start is not None:
            on_start(len(paths), total)
        for sha, p in zip(missing, paths, strict=True):
            self.put_blob(sha, p, on_bytes)
        final = self.get_package(result["package_id"])
        return {
            **final,
            "package_id": result["package_id"],
            "created": result.get("created", False),
            "uploaded_blobs": len(paths),
            "uploaded_bytes": total,
        }

    def list_devices(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/devices")["devices"])

    def get_device(self, device_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/devices/{device_id}"))

    def update_device_tags(
        self, device_id: str, add: list[str] | None = None, remove: list[str] | None = None
    ) -> dict[str, Any]:
        return dict(
            self.request("POST", f"/v1/devices/{device_id}/tags", json={"add": add or [], "remove": remove or []})
        )

    def revoke_device(self, device_id: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/v1/devices/{quote(device_id, safe='')}/revoke"))

    def rotate_credentials(self, device_id: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/v1/devices/{quote(device_id, safe='')}/rotate-credentials"))

    def list_admin_tokens(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/admin-tokens")["tokens"])

    def create_admin_token(self, name: str, role: str) -> dict[str, Any]:
        return dict(self.request("POST", "/v1/admin-tokens", json={"name": name, "role": role}))

    def revoke_admin_token(self, name: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/v1/admin-tokens/{quote(name, safe='')}/revoke"))

    def audit(self, since: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if since:
            params["since"] = since
        return list(self.request("GET", "/v1/audit", params=params)["entries"])

    def create_rollout(
        self,
        package_id: str | None,
        target: str | list[str] = "all",
        *,
        release: str | None = None,
        waves: list[str] | None = None,
        soak_s: float | None = None,
        wave_timeout_s: float | None = None,
        gates: dict[str, Any] | None = None,
        selector: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"target": target}
        if package_id is not None:
            body["package_id"] = package_id
        if release is not None:
            body["release"] = release
        if selector:
            body["selector"] = selector
        if waves:
            body["waves"] = waves
        if soak_s is not None:
            body["soak_s"] = soak_s
        if wave_timeout_s is not None:
            body["wave_timeout_s"] = wave_timeout_s
        if gates:
            body["gates"] = gates
        return dict(self.request("POST", "/v1/rollouts", json=body))

    def create_group(
        self, name: str, *, selector: str | None = None, devices: list[str] | None = None, priority: int = 0
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "selector": selector, "devices": devices, "priority": priority}
        return dict(self.request("POST", "/v1/groups", json=body))

    def list_groups(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/groups")["groups"])

    def get_group(self, name: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/groups/{quote(name, safe='')}"))

    def delete_group(self, name: str) -> dict[str, Any]:
        return dict(self.request("DELETE", f"/v1/groups/{quote(name, safe='')}"))

    def assign_group(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """body: package_id or release, and waves, soak_s, wave_timeout_s, gates as a rollout's."""
        return dict(self.request("POST", f"/v1/groups/{quote(name, safe='')}/assign", json=body))

    def unassign_group(self, name: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/v1/groups/{quote(name, safe='')}/unassign"))

    def control_rollout(self, rollout_id: str, action: str, reason: str = "") -> dict[str, Any]:
        """pause | resume | cancel."""
        return dict(self.request("POST", f"/v1/rollouts/{rollout_id}/{action}", json={"reason": reason}))

    def rollback_rollout(self, rollout_id: str) -> dict[str, Any]:
        """A new rollout returning every device `rollout_id` changed to its previous package."""
        return dict(self.request("POST", f"/v1/rollouts/{rollout_id}/rollback"))

    def list_rollouts(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/rollouts")["rollouts"])

    def get_rollout(self, rollout_id: str = "latest") -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/rollouts/{rollout_id}"))

    def explain_rollout(self, rollout_id: str = "latest", device_id: str | None = None) -> dict[str, Any]:
        params = {"device": device_id} if device_id else None
        return dict(self.request("GET", f"/v1/rollouts/{rollout_id}/explain", params=params))

    def create_release(self, name: str, version: str, package_ids: list[str]) -> dict[str, Any]:
        body = {"name": name, "version": version, "package_ids": package_ids}
        return dict(self.request("POST", "/v1/releases", json=body))

    def list_releases(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/releases")["releases"])

    def get_release(self, ref: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/releases/{ref}"))

    def stats(self) -> dict[str, Any]:
        return dict(self.request("GET", "/v1/stats"))

    def status(self) -> dict[str, Any]:
        return dict(self.request("GET", "/v1/status"))


def _first_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0]


def _detail(response: httpx.Response) -> str:
    try:
        detail: Any = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):  # FastAPI's 422: a list of problems
        detail = "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg', '')}" if isinstance(d, dict) else str(d)
            for d in detail
        )
    if not detail:
        detail = (response.text.strip().splitlines() or [""])[0][:200] or response.reason_phrase
    return f"{detail} (HTTP {response.status_code})"

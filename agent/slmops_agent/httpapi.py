"""The agent's small loopback HTTP server: Prometheus metrics at /metrics and an OpenAI-compatible
API (/v1/models, /v1/chat/completions and /v1/completions, with SSE streaming).

Starlette served by uvicorn on the agent's own event loop (no thread of its own), imported when the
first connection arrives (the socket listens from the start; with TLS, uvicorn loads the certificate
at start): an agent nobody asks over HTTP does not hold the HTTP stack in memory. The metrics are
read from the ModelHost at scrape time by one collector, in a registry of this server's own. The
OpenAI routes translate at the edge and use the same ModelHost (validation, queue, cancellation)
as gRPC; errors take their status from `errors.status_name` and become OpenAI error bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmops_agent.errors import AgentError
from slmops_agent.reach import TlsFiles, require_protection, token_matches
from slmops_agent.runtime.host import ModelHost

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric
    from starlette.requests import Request
    from starlette.responses import Response

log = logging.getLogger(__name__)

PREFIX = "slmops_agent"


class HostCollector:
    """Inference metrics of one ModelHost, read when scraped (a prometheus_client collector)."""

    def __init__(self, host: ModelHost) -> None:
        self.host = host

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        snap = self.host.metrics.snapshot()
        requests = CounterMetricFamily(f"{PREFIX}_requests", "Generation requests by status code.", labels=["code"])
        errors = CounterMetricFamily(
            f"{PREFIX}_errors", "Generation requests that did not end OK, by status code.", labels=["code"]
        )
        for code, n in sorted(snap.requests_by_code.items()):
            requests.add_metric([code], n)
            if code != "OK":
                errors.add_metric([code], n)
        yield requests
        yield errors
        yield HistogramMetricFamily(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from the request's arrival to its first token (queue wait included).",
            buckets=[(_le(bound / 1000), n) for bound, n in snap.ttft_buckets],
            sum_value=snap.ttft_sum_ms / 1000,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_completion_tokens", "Tokens generated.", value=snap.completion_tokens_total
        )
        yield CounterMetricFamily(f"{PREFIX}_prompt_tokens", "Prompt tokens read.", value=snap.prompt_tokens_total)
        yield CounterMetricFamily(
            f"{PREFIX}_decode_seconds",
            "Time spent decoding after the first token (rate(completion_tokens) / rate(this) is tokens/s).",
            value=snap.decode_seconds_total,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_tokens_per_second", "Decode speed of the last request.", value=snap.last_tokens_per_s
        )
        yield CounterMetricFamily(
            f"{PREFIX}_batches", "Batches of several requests decoded together.", value=snap.batches_total
        )
        yield CounterMetricFamily(
            f"{PREFIX}_batched_requests", "Requests that ran in a batch of several.", value=snap.batched_requests_total
        )
        yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "Requests waiting or running.", value=self.host.queue.depth)
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_bound", "Requests allowed to wait or run.", value=self.host.queue.bound
        )
        model = self.host.model
        active = GaugeMetricFamily(
            f"{PREFIX}_active_model",
            "1 for the model being served (its name, version, package and slot as labels).",
            labels=["name", "version", "package_id", "slot"],
        )
        if model is not None:
            i = model.info
            active.add_metric([i.name, i.version, i.package_id, i.slot], 1)
        yield active
        yield GaugeMetricFamily(f"{PREFIX}_model_loaded", "1 when a model is served.", value=int(model is not None))


def _le(seconds: float) -> str:
    return "+Inf" if seconds == float("inf") else repr(seconds)


def metrics_registry(host: ModelHost) -> CollectorRegistry:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(HostCollector(host))  # a collector by its collect()
    return registry


def build_app(host: ModelHost) -> Any:
    """/metrics and the OpenAI routes under /v1. Each part imports its libraries (prometheus_client;
    the OpenAI request models) on its first request, so an agent nobody scrapes or asks over HTTP
    does not hold them in memory."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    registry: list[CollectorRegistry] = []

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if not registry:
            registry.append(metrics_registry(host))
        return Response(generate_latest(registry[0]), media_type=CONTENT_TYPE_LATEST)

    base = Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])
    openai: list[Starlette] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and str(scope.get("path", "")).startswith("/v1"):
            if not openai:
                from slmops_agent.openai_api import openai_routes

                openai.append(Starlette(routes=openai_routes(host)))
            await openai[0](scope, receive, send)
            return
        await base(scope, receive, send)

    return app


def require_token(app: Any, token: str) -> Any:
    """ASGI wrapper: /v1/* answers 401 (an OpenAI error body) unless `authorization: Bearer <token>`."""
    from starlette.responses import JSONResponse

    async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and str(scope.get("path", "")).startswith("/v1"):
            header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), None)
            if not token_matches(header, token):
                message = "wrong bearer token" if header else "a bearer token is required (Authorization: Bearer ...)"
                body = {"error": {"message": message, "type": "authentication_error", "code": "UNAUTHENTICATED"}}
                response = JSONResponse(body, status_code=401, headers={"www-authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await app(scope, receive, send)

    return guarded


def _server_class() -> type[Any]:
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn without its signal handlers: the agent owns SIGTERM/SIGINT."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return _Server


class HttpServer:
    """Serves the app on host:port (0: a free port, written to `addr_file`) on the running loop."""

    def __init__(
        self,
        host: ModelHost,
        *,
        address: str = "127.0.0.1",
        port: int = 0,
        addr_file: Path | None = None,
        tls: TlsFiles | None = None,
        token: str | None = None,
    ) -> None:
        self.host = host
        self.tls = tls
        self.token = token or None
        self.address = address
        self.port = port
        self.addr_file = addr_file
        self.url = ""
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self._starting: asyncio.Future[None] | None = None
        self._app_factory: Callable[[ModelHost], Any] = build_app

    async def start(self) -> str:
        """Listen, and serve from the first connection on (with TLS: at once); returns the URL."""
        require_protection("HTTP", self.address, self.tls, self.token)
        sock = socket.socket(socket.AF_INET6 if ":" in self.address else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.address, self.port))
        except OSError as exc:
            sock.close()
            raise AgentError(f"HTTP cannot listen on {self.address}:{self.port}: {exc.strerror}") from exc
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock
        port = sock.getsockname()[1]
        if self.tls is None:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._first_connection)
        else:  # a certificate uvicorn cannot load is refused at start, not at the first request
            try:
                await self._serve()
            except BaseException:
                self._server = self._task = None
                self._sock = None
                sock.close()
                raise
        host = f"[{self.address}]" if ":" in self.address else self.address
        self.url = f"{'https' if self.tls is not None else 'http'}://{host}:{port}"
        if self.addr_file is not None:
            self.addr_file.write_text(f"{host}:{port}\n")
        log.info("HTTP (metrics) on %s", self.url)
        return self.url

    def _first_connection(self) -> None:
        """A connection waits in the socket's backlog: start uvicorn, which accepts it."""
        assert self._sock is not None
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._starting = asyncio.ensure_future(self._serve())
        self._starting.add_done_callback(self._started)

    def _started(self, starting: asyncio.Future[None]) -> None:
        if not starting.cancelled() and starting.exception() is not None:
            log.error("the HTTP server did not start", exc_info=starting.exception())

    async def _serve(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        # the imports (uvicorn, starlette: ~0.1 s) in a thread, not on the loop gRPC shares
        server_class = await loop.run_in_executor(None, _server_class)
        app: Any = await loop.run_in_executor(None, self._app_factory, self.host)
        if self.token is not None:
            app = require_token(app, self.token)
        import uvicorn

        tls_kw: dict[str, Any] = {}
        if self.tls is not None:
            tls_kw = {"ssl_certfile": str(self.tls.cert_path), "ssl_keyfile": str(self.tls.key_path)}
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", ws="none", **tls_kw)
        self._server = server_class(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]), name="slmops-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise AgentError("the HTTP server stopped at start-up")
            await asyncio.sleep(0.01)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._starting is not None:
            with contextlib.suppress(Exception):
                await self._starting
        if self._server is None or self._task is None:  # uvicorn never took the socket: close it here
            if self._sock is not None:
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
                self._sock.close()
                self._sock = None
                if self.addr_file is not None:
                    self.addr_file.unlink(missing_ok=True)
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, grace_s + 1)
        except asyncio.TimeoutError:  # not TimeoutError before Python 3.11
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._server = self._task = None
        self._sock = None  # closed by uvicorn
        if self.addr_file is not None:
            self.addr_file.unlink(missing_ok=True)

"""The local gRPC API (slmops.agent.v1.Inference), the health service and reflection.

The servicer translates messages (`codec`) and delegates to the ModelHost; the token loop runs in a
worker thread. One interceptor maps the agent's error types to status codes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from slmops_agent.codec import final_to_pb, models_to_pb, request_from_pb, status_to_pb, text_to_pb
from slmops_agent.errors import AgentError, Cancelled, InvalidRequest, QueueFull, status_name
from slmops_agent.reach import TlsFiles, auth_interceptor, require_protection
from slmops_agent.relay import Relay
from slmops_agent.runtime.host import ModelHost
from slmops_agent.runtime.model import LoadedModel, ModelInfo
from slmops_agent.runtime.queue import CLIENT_HEADER, client_key
from slmops_agent.runtime.requests import CancelToken, GenerationResult
from slmops_protos.agent.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
MAX_UNIX_PATH = 107

RETRY_AFTER_KEY = "retry-after-ms"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The agent's errors as gRPC status codes (the names come from `errors.status_name`)."""
    code = grpc.StatusCode[status_name(exc)]
    if code is grpc.StatusCode.INTERNAL:
        return code, f"internal error: {type(exc).__name__}: {exc}"
    return code, str(exc)


def trailers_for(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata that goes with an error: a retry hint when the queue is full."""
    if isinstance(exc, QueueFull):
        return ((RETRY_AFTER_KEY, str(exc.retry_after_ms)),)
    return ()


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions escaping a handler into a status (AgentError -> its code, anything else INTERNAL)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = getattr(handler_call_details, "method", "?")
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner_uu(request, context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:
                    await _abort(context, exc, method)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for item in inner_us(request, context):
                        yield item
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:
                    await _abort(context, exc, method)

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=exc)
    else:
        log.debug("%s: %s %s", method, code.name, message)
    await context.abort(code, message, trailing_metadata=trailers_for(exc))


@dataclass(frozen=True)
class AgentStatus:
    device_id: str = ""
    update_state: str = "IDLE"
    active_slot: str = ""
    agent_version: str = ""
    uptime_s: float = 0.0
    installed: list[ModelInfo] = field(default_factory=list)  # the packages in the slots


def _default_status() -> AgentStatus:
    return AgentStatus()


def _client(context: grpc.aio.ServicerContext) -> str:
    """The call's client for the queue: its peer and its `x-slmops-client` metadata."""
    declared = dict(context.invocation_metadata() or ()).get(CLIENT_HEADER)
    return client_key(declared if isinstance(declared, str) else None, str(context.peer()))


def _why(context: grpc.aio.ServicerContext) -> str:
    """Why a call ends early: its deadline passed, or else the client cancelled it."""
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0.01 else "CANCELLED"


def _no_removal(name: str) -> None:
    raise AgentError("this agent does not manage adapters (it has no updater)")


class InferenceServicer(agent_pb2_grpc.InferenceServicer):
    def __init__(
        self,
        host: ModelHost,
        status: Callable[[], AgentStatus] = _default_status,
        remove_adapter: Callable[[str], None] = _no_removal,
    ) -> None:
        self.host = host
        self.status = status
        self.remove_adapter = remove_adapter

    async def Generate(
        self, request: agent_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.GenerateResponse]:
        req = request_from_pb(request)
        relay = Relay(asyncio.get_running_loop(), self.host.stream_group_s, self.host.first_yield_s)
        cancel = CancelToken()

        def put(kind: str, value: Any) -> None:
            if not relay.put(kind, value):  # the loop is closed: nobody is listening any more
                cancel.set()

        def done(future: concurrent.futures.Future[GenerationResult]) -> None:
            exc = future.exception() if not future.cancelled() else Cancelled("the request was cancelled")
            if exc is not None:
                put("error", exc)
            else:
                put("done", future.result())

        try:
            # validation and the queue's bound are checked here, at once; the token loop runs in a worker
            future = self.host.submit(
                req,
                cancel=cancel,
                on_text=lambda t: put("text", t),
                on_start=lambda i: put("start", i),
                client=_client(context),
            )
            future.add_done_callback(done)
            info = ModelInfo()
            while True:
                kind, value = await relay.next()
                if kind == "start":
                    info = value
                elif kind == "text":
                    yield text_to_pb(value, info)
                elif kind == "done":
                    yield final_to_pb(value, text="")
                    return
                else:
                    raise value
        finally:
            cancel.cancel(_why(context))  # the client went away, the deadline passed, or we are done

    async def GenerateUnary(
        self, request: agent_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.GenerateResponse:
        req = request_from_pb(request)
        cancel = CancelToken()
        try:
            result = await asyncio.wrap_future(self.host.submit(req, cancel=cancel, client=_client(context)))
        finally:
            cancel.cancel(_why(context))
        return final_to_pb(result, text=result.text)

    async def ListModels(
        self, request: agent_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.ListModelsResponse:
        status = self.status()
        model = self.host.model
        infos = status.installed or ([model.info] if model is not None else [])
        return models_to_pb(infos, model.info.package_id if model is not None else "")

    async def RemoveAdapter(
        self, request: agent_pb2.RemoveAdapterRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.ListModelsResponse:
        if not request.name or not request.name.isprintable():
            raise InvalidRequest("name the adapter to remove")
        await asyncio.get_running_loop().run_in_executor(None, self.remove_adapter, request.name)
        return await self.ListModels(agent_pb2.ListModelsRequest(), context)

    async def GetStatus(
        self, request: agent_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.GetStatusResponse:
        status = self.status()
        model = self.host.model
        return status_to_pb(
            status,
            model.info if model is not None else None,
            queue_depth=self.host.queue.depth,
            requests_total=self.host.metrics.requests_total,
            errors_total=self.host.metrics.errors_total,
        )


class AgentServer:
    """The grpc.aio server on a Unix socket and (optionally) a TCP address."""

    def __init__(
        self,
        host: ModelHost,
        *,
        socket_path: Path | None,
        tcp_address: str | None,
        status: Callable[[], AgentStatus] = _default_status,
        remove_adapter: Callable[[str], None] = _no_removal,
        addr_file: Path | None = None,
        tls: TlsFiles | None = None,
        token: str | None = None,
    ) -> None:
        self.host = host
        self.tls = tls
        self.token = token or None
        self.socket_path = socket_path
        self.tcp_address = tcp_address
        self.addr_file = addr_file
        self.status = status
        self.remove_adapter = remove_adapter
        self.server: grpc.aio.Server | None = None
        self.health = health_aio.HealthServicer()
        self.addresses: list[str] = []
        self.tcp_port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> list[str]:
        if self.tcp_address is not None:
            require_protection("gRPC", self.tcp_address.rpartition(":")[0], self.tls, self.token)
        self._loop = asyncio.get_running_loop()
        interceptors: list[grpc.aio.ServerInterceptor] = [ErrorInterceptor()]
        if self.token is not None:
            interceptors.insert(0, auth_interceptor(self.token))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 8 * 1024 * 1024)],
        )
        agent_pb2_grpc.add_InferenceServicer_to_server(
            InferenceServicer(self.host, self.status, self.remove_adapter), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            server,
        )
        addresses = []
        if self.socket_path is not None:
            _prepare_socket(self.socket_path)
            target = f"unix:{self.socket_path}"
            _bind(server, target)
            addresses.append(target)
        if self.tcp_address is not None:
            port = _bind(server, self.tcp_address, self.tls)
            hostname = self.tcp_address.rpartition(":")[0]
            self.tcp_port = port
            addresses.append(f"{hostname}:{port}")
        if not addresses:
            raise AgentError("gRPC has nowhere to listen (no socket and no TCP address)")
        await server.start()
        if self.socket_path is not None:
            os.chmod(self.socket_path, 0o660)
        self.server = server
        self.addresses = addresses
        await self._set_health(self.host.model)
        self.host.add_listener(self._on_model)
        if self.addr_file is not None and self.tcp_port is not None:
            self.addr_file.write_text(addresses[-1] + "\n")
        return addresses

    def _on_model(self, model: LoadedModel | None) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._set_health(model), loop)

    async def _set_health(self, model: LoadedModel | None) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if model is not None
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def stop(self, grace_s: float) -> None:
        """Stop accepting; in-flight calls get `grace_s` to finish, then they are cancelled."""
        if self.server is None:
            return
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        self.server = None
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)
        if self.addr_file is not None:
            self.addr_file.unlink(missing_ok=True)

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()


def _bind(server: grpc.aio.Server, target: str, tls: TlsFiles | None = None) -> int:
    try:
        if tls is not None:
            port = server.add_secure_port(target, grpc.ssl_server_credentials([(tls.key, tls.cert)]))
        else:
            port = server.add_insecure_port(target)
    except RuntimeError as exc:
        raise AgentError(f"cannot listen on {target}: {exc}") from exc
    if port == 0 and not target.startswith("unix:"):
        raise AgentError(f"cannot listen on {target} (address in use?)")
    return port


def _prepare_socket(path: Path) -> None:
    if len(str(path)) > MAX_UNIX_PATH:
        raise AgentError(f"Unix socket path is {len(str(path))} characters (limit {MAX_UNIX_PATH}): {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale socket of an agent that is gone
        else:
            raise AgentError(f"{path} is in use by another process")
        finally:
            probe.close()

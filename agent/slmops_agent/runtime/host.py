"""The model host: serves the active model through the queue, batches the requests that can share a
turn, and swaps the model while requests run."""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from slmops_agent.errors import AgentError, Cancelled, NoModelLoaded, NotFound, status_name
from slmops_agent.relay import FIRST_YIELD_S, GROUP_S
from slmops_agent.runtime.batching import BatchMember
from slmops_agent.runtime.metrics import Metrics
from slmops_agent.runtime.model import LoadedModel, ModelInfo
from slmops_agent.runtime.queue import RequestQueue, Ticket
from slmops_agent.runtime.requests import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Limits,
    cancel_reason,
    validate_request,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Job:
    req: GenerationRequest
    cancel: threading.Event
    on_text: Callable[[str], None] | None
    on_start: Callable[[ModelInfo], None] | None
    started: float


class ModelHost:
    """Serves the active model. `swap` replaces it at once; requests already running finish on the
    model they started with (they hold a reference to it).

    `submit` validates and takes a place in the bounded queue at once (raising InvalidRequest,
    NoModelLoaded or QueueFull in the caller's thread), then waits and generates in a worker of a
    pool as large as the queue bound, so threads never outnumber the places. When its turn comes, a
    request heads a batch of the requests behind it that can share one (`LoadedModel.batchable`, up
    to the model's `max_batch`); each member still streams, stops and is cancelled on its own.
    `batch_linger_s`: after a batch of several, how long the next head may wait for the clients of
    that batch to come back (only when the queue has just fallen idle). `stream_group_s`: the servers'
    streams send the text after the first piece in groups this far apart (`relay.Relay`);
    `first_yield_s`: how long their generation pauses once the first piece is handed over."""

    def __init__(
        self,
        *,
        queue_bound: int,
        queue_per_client: int | None = None,
        limits: Limits,
        metrics: Metrics | None = None,
        batch_linger_s: float = 0.02,
        stream_group_s: float = GROUP_S,
    ) -> None:
        self.queue = RequestQueue(queue_bound, queue_per_client)
        self.limits = limits
        self.metrics = metrics or Metrics()
        self.batch_linger_s = batch_linger_s
        self.stream_group_s = stream_group_s
        self._model: LoadedModel | None = None
        self._lock = threading.Lock()
        self._listeners: list[Callable[[LoadedModel | None], None]] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=queue_bound, thread_name_prefix="slmops-gen")

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    @property
    def first_yield_s(self) -> float:
        """`relay.FIRST_YIELD_S` when the model's threads take every core (nothing else would get one
        to send the first piece), else 0."""
        model = self._model
        return FIRST_YIELD_S if model is not None and model.threads >= (os.cpu_count() or 1) else 0.0

    def add_listener(self, callback: Callable[[LoadedModel | None], None]) -> None:
        self._listeners.append(callback)

    def swap(self, model: LoadedModel | None) -> LoadedModel | None:
        with self._lock:
            old, self._model = self._model, model
        if model is not None:
            log.info(
                "serving %s %s (%s) from slot %s: %d threads, spinning %s",
                model.info.name,
                model.info.version,
                model.info.package_id[:12],
                model.info.slot,
                model.threads,
                "on" if model.spinning else "off",
            )
        for callback in self._listeners:
            try:
                callback(model)
            except Exception:
                log.exception("model listener failed")
        return old

    def close(self) -> None:
        """Stop the worker pool (running requests finish; call after cancelling them)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def submit(
        self,
        req: GenerationRequest,
        *,
        cancel: threading.Event | None = None,
        on_text: Callable[[str], None] | None = None,
        on_start: Callable[[ModelInfo], None] | None = None,
        client: str = "",
    ) -> concurrent.futures.Future[GenerationResult]:
        """Validate and queue now (errors raise here); generate in a worker. `on_start` is told which
        model answers once the request has its turn; `cancel` stops it within one token; `client`
        is who asks (the queue takes clients in turn and caps each)."""
        started = time.perf_counter()
        cancel = cancel or threading.Event()
        self.metrics.request()
        try:
            validate_request(req, self.limits)
            if self._model is None:
                raise NoModelLoaded("no model is loaded yet (the device has not installed a package)")
            ticket = self.queue.admit(_Job(req, cancel, on_text, on_start, started), client)
        except BaseException as exc:
            self.metrics.outcome(status_name(exc))
            raise
        try:
            future = self._pool.submit(self._run, ticket)
        except RuntimeError as exc:  # the pool is shut down: the agent is stopping
            self.queue.release(ticket, measure=False)
            self.metrics.outcome("UNAVAILABLE")
            raise NoModelLoaded("the agent is shutting down") from exc

        def never_ran(f: concurrent.futures.Future[GenerationResult]) -> None:
            if f.cancelled():  # cancelled before a worker picked it up: `_run` will not free the place
                cancel.set()  # should another head have taken it into a batch, it stops there
                self.queue.release(ticket, measure=False)
                self.metrics.outcome("CANCELLED")

        future.add_done_callback(never_ran)
        return future

    def _fits(self, ticket: Ticket) -> bool:
        model = self._model
        return model is not None and ticket.job is not None and model.batchable(ticket.job.req)

    def _run(self, ticket: Ticket) -> GenerationResult:
        job: _Job = ticket.job
        try:
            batch = self.queue.start(
                ticket,
                job.cancel,
                fits=self._fits,
                max_batch=self._model.max_batch if self._model is not None else 1,
                linger_s=self.batch_linger_s,
            )
            if batch is not None:
                self._generate(batch)
            ticket.finished.wait()  # a member of another's batch: until its head says it ended
            if isinstance(ticket.outcome, BaseException):
                raise ticket.outcome
            result: GenerationResult = ticket.outcome
        except BaseException as exc:
            code = cancel_reason(job.cancel) if isinstance(exc, Cancelled) else status_name(exc)
            if code == "INTERNAL" and not isinstance(exc, AgentError):
                log.error("generation failed", exc_info=exc)
            self.metrics.outcome(code)
            raise
        finally:
            self.queue.release(ticket, measure=False)  # a request that never ran; no-op once ended
        self.metrics.outcome(cancel_reason(job.cancel) if result.finish_reason is FinishReason.CANCELLED else "OK")
        self.metrics.result(result)
        return result

    def _end(self, ticket: Ticket, outcome: GenerationResult | BaseException) -> None:
        ticket.outcome = outcome
        self.queue.release(ticket)
        ticket.finished.set()

    def _generate(self, batch: list[Ticket]) -> None:
        """Run a turn: each ticket ends (`_end`) with its result or its own error."""
        model = self._model
        members: list[Ticket] = []
        for ticket in batch:
            job: _Job = ticket.job
            try:
                if model is None:
                    raise NoModelLoaded("no model is loaded")
                if job.req.model_version and job.req.model_version not in (model.info.version, model.info.package_id):
                    raise NotFound(
                        f"model version {job.req.model_version!r} is not active (active: {model.info.version})"
                    )
                if job.on_start is not None:
                    job.on_start(model.info)
                members.append(ticket)
            except BaseException as exc:
                self._end(ticket, exc)
        if model is None or not members:
            return
        if len(members) == 1:
            ticket = members[0]
            job = ticket.job
            try:
                result = model.generate(
                    job.req,
                    limits=self.limits,
                    cancel=job.cancel,
                    on_text=job.on_text,
                    started=job.started,
                    pause=functools.partial(self.queue.pause, members, job.cancel.is_set),
                )
            except BaseException as exc:
                self._end(ticket, exc)
            else:
                self._end(ticket, result)
            return
        self.metrics.batch(len(members))
        model.generate_batch(
            [
                BatchMember(t.job.req, t.job.cancel, t.job.on_text, t.job.started, functools.partial(self._end, t))
                for t in members
            ],
            limits=self.limits,
            pause=functools.partial(self.queue.pause, members, lambda: all(t.job.cancel.is_set() for t in members)),
        )

    def generate(
        self,
        req: GenerationRequest,
        *,
        cancel: threading.Event | None = None,
        on_text: Callable[[str], None] | None = None,
        on_start: Callable[[ModelInfo], None] | None = None,
        client: str = "",
    ) -> GenerationResult:
        """`submit` and wait for the result (blocking); if the wait is interrupted, the generation stops."""
        cancel = cancel or threading.Event()
        future = self.submit(req, cancel=cancel, on_text=on_text, on_start=on_start, client=client)
        try:
            return future.result()
        except BaseException:
            if not future.done():
                cancel.set()
            raise

"""The inference runtime: an onnxruntime-genai model loaded from a slot folder, and the host
that serves the active one (a bounded FIFO queue, one generation at a time, hot swap)."""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import enum
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops_agent.errors import (
    AgentError,
    Cancelled,
    InvalidRequest,
    ModelLoadError,
    NoModelLoaded,
    NotFound,
    QueueFull,
    status_name,
)

log = logging.getLogger(__name__)

MAX_SEED = 2**31 - 1  # onnxruntime-genai takes a 32-bit seed
DEFAULT_PROMPT = "Hello"


class FinishReason(enum.Enum):
    LENGTH = "LENGTH"
    STOP = "STOP"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True)
class ModelInfo:
    name: str = ""
    version: str = ""
    package_id: str = ""
    profile: str = ""
    slot: str = ""
    adapters: tuple[str, ...] = ()
    # relative path of each adapter file inside the slot folder
    adapter_files: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    """A request, translated from GenerateRequest at the gRPC edge."""

    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    max_new_tokens: int = 0  # 0: the server default
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    adapter: str = ""
    model_version: str = ""
    repetition_penalty: float | None = None


@dataclass(frozen=True)
class GenerationResult:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float
    tokens_per_s: float
    total_ms: float
    model_version: str
    package_id: str


@dataclass(frozen=True)
class Limits:
    default_max_new_tokens: int = 256
    max_new_tokens_limit: int = 4096
    max_prompt_chars: int = 1_000_000  # checked before tokenizing; the context check comes after
    max_messages: int = 1024
    max_stop_sequences: int = 16
    max_stop_chars: int = 256


_ROLES = ("system", "user", "assistant", "tool")
MAX_TOP_K = 100_000


def validate_request(req: GenerationRequest, limits: Limits) -> None:
    """Raise InvalidRequest with a clear message for anything the model must not see."""
    if req.prompt and req.messages:
        raise InvalidRequest("give either prompt or messages, not both")
    if not req.prompt and not req.messages:
        raise InvalidRequest("prompt and messages are both empty")
    if len(req.messages) > limits.max_messages:
        raise InvalidRequest(f"{len(req.messages)} messages; the limit is {limits.max_messages}")
    chars = len(req.prompt) + sum(len(c) for _, c in req.messages)
    if chars > limits.max_prompt_chars:
        raise InvalidRequest(f"the prompt is {chars} characters; the limit is {limits.max_prompt_chars}")
    for i, (role, content) in enumerate(req.messages):
        if role not in _ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(_ROLES)}; got {role!r}")
        if not content:
            raise InvalidRequest(f"messages[{i}].content is empty")
    if req.max_new_tokens > limits.max_new_tokens_limit:
        raise InvalidRequest(f"max_new_tokens is {req.max_new_tokens}; the limit is {limits.max_new_tokens_limit}")
    if req.temperature is not None and not 0.0 <= req.temperature <= 10.0:
        raise InvalidRequest(f"temperature must be in [0, 10]; got {req.temperature}")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise InvalidRequest(f"top_p must be in (0, 1]; got {req.top_p}")
    if req.top_k is not None and not 0 <= req.top_k <= MAX_TOP_K:
        raise InvalidRequest(f"top_k must be in [0, {MAX_TOP_K}]; got {req.top_k}")
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        raise InvalidRequest(f"seed must be in [0, {MAX_SEED}]; got {req.seed}")
    if req.repetition_penalty is not None and not 0.0 < req.repetition_penalty <= 10.0:
        raise InvalidRequest(f"repetition_penalty must be in (0, 10]; got {req.repetition_penalty}")
    if len(req.stop) > limits.max_stop_sequences:
        raise InvalidRequest(f"at most {limits.max_stop_sequences} stop sequences; got {len(req.stop)}")
    for i, stop in enumerate(req.stop):
        if not stop:
            raise InvalidRequest(f"stop sequences must not be empty (stop[{i}])")
        if len(stop) > limits.max_stop_chars:
            raise InvalidRequest(f"stop[{i}] is {len(stop)} characters; the limit is {limits.max_stop_chars}")
    if req.adapter and not req.adapter.isprintable():
        raise InvalidRequest("adapter name has control characters")


class _StopScanner:
    """Holds back text that may be the start of a stop sequence; finds the first stop."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add decoded text; return what can be emitted now."""
        self.text += piece
        if not self.stops:
            out = self.text[self.emitted :]
            self.emitted = len(self.text)
            return out
        first = -1
        for s in self.stops:
            i = self.text.find(s, self.emitted)
            if i >= 0 and (first < 0 or i < first):
                first = i
        if first >= 0:
            out = self.text[self.emitted : first]
            self.text = self.text[:first]
            self.emitted = first
            self.stopped = True
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text) - self.emitted), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        end = len(self.text) - hold
        out = self.text[self.emitted : end]
        self.emitted = end
        return out

    def flush(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out


def _genai() -> Any:
    import onnxruntime_genai as og

    return og


class LoadedModel:
    """One slot folder loaded with onnxruntime-genai. Generation on one instance is serialized by its host."""

    def __init__(self, path: Path, info: ModelInfo, *, threads: int) -> None:
        og = _genai()
        self.path = path
        self.info = info
        self.threads = threads
        try:
            genai_config = json.loads((path / "genai_config.json").read_text())
            cfg = og.Config(str(path))
            cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
            self.model = og.Model(cfg)
            self.tokenizer = og.Tokenizer(self.model)
            self.adapters: Any = None
            if info.adapter_files:
                self.adapters = og.Adapters(self.model)
                for name, rel in info.adapter_files:
                    self.adapters.load(str(path / rel), name)
        except FileNotFoundError as exc:
            raise ModelLoadError(f"{path} is not an onnxruntime-genai folder: {exc.filename} is missing") from exc
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelLoadError(f"onnxruntime-genai cannot load {path}: {str(exc).splitlines()[0]}") from exc
        model_cfg = genai_config.get("model", {})
        self.context_length = int(model_cfg.get("context_length") or 2048)
        self.vocab_size = int(model_cfg.get("vocab_size") or 0)  # 0: unknown
        eos = model_cfg.get("eos_token_id", [])
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [eos])
        self.eos_ids.update(int(t) for t in self.tokenizer.eos_token_ids)

    def encode(self, req: GenerationRequest) -> list[int]:
        if req.messages:
            messages = [{"role": r, "content": c} for r, c in req.messages]
            try:
                text = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
            except RuntimeError as exc:
                raise InvalidRequest(f"the model's chat template refused the messages: {exc}") from exc
        else:
            text = req.prompt
        ids = [int(t) for t in self.tokenizer.encode(text)]
        if not ids:
            raise InvalidRequest("the prompt encodes to no tokens")
        return ids

    def generate(
        self,
        req: GenerationRequest,
        *,
        limits: Limits,
        cancel: threading.Event | None = None,
        on_text: Callable[[str], None] | None = None,
        started: float | None = None,
    ) -> GenerationResult:
        """Run the token loop; call `on_text` with each decoded piece; stop within one token of `cancel`."""
        og = _genai()
        t0 = started if started is not None else time.perf_counter()
        cancel = cancel or threading.Event()
        if req.adapter and (self.adapters is None or req.adapter not in self.info.adapters):
            have = ", ".join(self.info.adapters) or "none"
            raise NotFound(f"adapter {req.adapter!r} is not loaded (this model has: {have})")
        ids = self.encode(req)
        if len(ids) >= self.context_length:
            raise InvalidRequest(f"the prompt is {len(ids)} tokens; the model's context is {self.context_length}")
        max_new = min(req.max_new_tokens or limits.default_max_new_tokens, self.context_length - len(ids))
        options: dict[str, Any] = {"max_length": len(ids) + max_new}
        # Unset fields keep the package's generation defaults (genai_config.json "search");
        # temperature 0 asks for greedy decoding, > 0 for sampling at that temperature.
        if req.temperature is not None:
            options["do_sample"] = req.temperature > 0
            if req.temperature > 0:
                options["temperature"] = req.temperature
        if req.top_p is not None:
            options["top_p"] = req.top_p
        if req.top_k is not None:
            # more than the vocabulary: all of it (onnxruntime-genai refuses more)
            options["top_k"] = min(req.top_k, self.vocab_size) if self.vocab_size else req.top_k
        if req.seed is not None:
            options["random_seed"] = int(req.seed)
        if req.repetition_penalty is not None:
            options["repetition_penalty"] = req.repetition_penalty
        params = og.GeneratorParams(self.model)
        try:
            params.set_search_options(**options)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise InvalidRequest(f"onnxruntime-genai refused the search options: {exc}") from exc
        generator = og.Generator(self.model, params)
        if req.adapter:
            generator.set_active_adapter(self.adapters, req.adapter)
        stream = self.tokenizer.create_stream()
        scanner = _StopScanner(req.stop)
        finish = FinishReason.LENGTH
        generated = 0
        t_first = t_last = 0.0
        if cancel.is_set():
            finish = FinishReason.CANCELLED
        else:
            generator.append_tokens(ids)
        while finish is not FinishReason.CANCELLED and not generator.is_done():
            if cancel.is_set():
                finish = FinishReason.CANCELLED
                break
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            t_last = time.perf_counter()
            if generated == 0:
                t_first = t_last
            if token in self.eos_ids:
                finish = FinishReason.STOP
                break
            generated += 1
            out = scanner.feed(stream.decode(token))
            if out and on_text is not None:
                on_text(out)
            if scanner.stopped:
                finish = FinishReason.STOP
                break
            if generated >= max_new:
                break
        if finish is not FinishReason.STOP:
            rest = scanner.flush()
            if rest and on_text is not None:
                on_text(rest)
        t_end = time.perf_counter()
        decode_s = t_last - t_first
        return GenerationResult(
            text=scanner.text,
            finish_reason=finish,
            prompt_tokens=len(ids),
            completion_tokens=generated,
            ttft_ms=(t_first - t0) * 1000 if t_first else 0.0,
            tokens_per_s=(generated - 1) / decode_s if generated > 1 and decode_s > 0 else 0.0,
            total_ms=(t_end - t0) * 1000,
            model_version=self.info.version,
            package_id=self.info.package_id,
        )


def load_model(path: Path, info: ModelInfo, *, threads: int) -> LoadedModel:
    return LoadedModel(path, info, threads=threads)


class CancelToken(threading.Event):
    """A cancel flag that keeps why the request ends early (a status code name, for the metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.reason = "CANCELLED"

    def cancel(self, reason: str = "CANCELLED") -> None:
        if not self.is_set():
            self.reason = reason
            self.set()


def _cancel_reason(cancel: threading.Event) -> str:
    return cancel.reason if isinstance(cancel, CancelToken) else "CANCELLED"


class Ticket:
    """A place in the queue."""

    __slots__ = ("admitted",)

    def __init__(self) -> None:
        self.admitted = time.monotonic()


class RequestQueue:
    """A bounded FIFO of requests; one runs at a time. Past the bound: QueueFull, with a retry hint
    from the recent time per request."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._cond = threading.Condition()
        self._tickets: collections.deque[Ticket] = collections.deque()
        self._turn_ms = 0.0  # moving average of the time a turn takes

    @property
    def depth(self) -> int:
        """Requests waiting or running."""
        return len(self._tickets)

    def retry_after_ms(self) -> int:
        """When a place is likely free: after the running turn, so the recent mean turn (1 s before
        any), within [50 ms, 60 s]."""
        return int(min(60_000.0, max(50.0, self._turn_ms or 1000.0)))

    def admit(self) -> Ticket:
        """Take a place at the end of the queue or raise QueueFull at once."""
        with self._cond:
            depth = len(self._tickets)
            if depth >= self.bound:
                raise QueueFull(
                    f"{depth} requests are queued (the bound is {self.bound}); retry later",
                    retry_after_ms=self.retry_after_ms(),
                )
            ticket = Ticket()
            self._tickets.append(ticket)
            return ticket

    def wait(self, ticket: Ticket, cancel: threading.Event) -> None:
        """Block until `ticket` is first; Cancelled if `cancel` is set first."""
        with self._cond:
            while self._tickets[0] is not ticket:
                if cancel.is_set():
                    raise Cancelled("cancelled while waiting in the queue")
                self._cond.wait(0.02)

    def release(self, ticket: Ticket, *, ran_s: float | None = None) -> None:
        with self._cond:
            self._tickets.remove(ticket)
            if ran_s is not None:
                ms = ran_s * 1000
                self._turn_ms = ms if not self._turn_ms else 0.8 * self._turn_ms + 0.2 * ms
            self._cond.notify_all()

    @contextmanager
    def turn(self, cancel: threading.Event) -> Iterator[None]:
        ticket = self.admit()
        ran: float | None = None
        try:
            self.wait(ticket, cancel)
            t0 = time.perf_counter()
            yield
            ran = time.perf_counter() - t0
        finally:
            self.release(ticket, ran_s=ran)


TTFT_BUCKETS_MS = (5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0)
CALLER_CODES = frozenset({"OK", "INVALID_ARGUMENT", "NOT_FOUND", "CANCELLED", "DEADLINE_EXCEEDED"})


@dataclass(frozen=True)
class MetricsSnapshot:
    requests_by_code: dict[str, int]
    ttft_buckets: tuple[tuple[float, int], ...]  # cumulative (upper bound ms, count), +inf last
    ttft_sum_ms: float
    ttft_count: int
    completion_tokens_total: int
    prompt_tokens_total: int
    decode_seconds_total: float
    last_tokens_per_s: float


@dataclass
class Metrics:
    """Inference counters for GetStatus, telemetry and /metrics (thread-safe). Every request ends
    with one `outcome` (a status code name); errors_total counts the device's errors, not the caller's
    mistakes, cancellations or deadlines."""

    requests_total: int = 0
    errors_total: int = 0
    _ttft_sum: float = 0.0
    _ttft_n: int = 0
    _tps_sum: float = 0.0
    _tps_n: int = 0
    _by_code: dict[str, int] = field(default_factory=dict, repr=False)
    _ttft_hist: list[int] = field(default_factory=lambda: [0] * (len(TTFT_BUCKETS_MS) + 1), repr=False)
    _ttft_total_ms: float = 0.0
    _ttft_total_n: int = 0
    _completion_tokens: int = 0
    _prompt_tokens: int = 0
    _decode_s: float = 0.0
    _last_tps: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request(self) -> None:
        with self._lock:
            self.requests_total += 1

    def outcome(self, code: str) -> None:
        with self._lock:
            self._by_code[code] = self._by_code.get(code, 0) + 1
            if code not in CALLER_CODES:
                self.errors_total += 1

    def result(self, result: GenerationResult) -> None:
        with self._lock:
            self._completion_tokens += result.completion_tokens
            self._prompt_tokens += result.prompt_tokens
            if result.completion_tokens > 0:
                self._ttft_sum += result.ttft_ms
                self._ttft_n += 1
                self._ttft_hist[bisect.bisect_left(TTFT_BUCKETS_MS, result.ttft_ms)] += 1
                self._ttft_total_ms += result.ttft_ms
                self._ttft_total_n += 1
            if result.tokens_per_s > 0:
                self._tps_sum += result.tokens_per_s
                self._tps_n += 1
                self._last_tps = result.tokens_per_s
                self._decode_s += (result.completion_tokens - 1) / result.tokens_per_s

    def window(self) -> tuple[float, float]:
        """Mean (tokens/s, TTFT ms) since the previous call."""
        with self._lock:
            tps = self._tps_sum / self._tps_n if self._tps_n else 0.0
            ttft = self._ttft_sum / self._ttft_n if self._ttft_n else 0.0
            self._ttft_sum = self._tps_sum = 0.0
            self._ttft_n = self._tps_n = 0
            return tps, ttft

    def snapshot(self) -> MetricsSnapshot:
        with self._lock:
            cumulative, acc = [], 0
            for bound, n in zip((*TTFT_BUCKETS_MS, float("inf")), self._ttft_hist, strict=True):
                acc += n
                cumulative.append((bound, acc))
            return MetricsSnapshot(
                requests_by_code=dict(self._by_code),
                ttft_buckets=tuple(cumulative),
                ttft_sum_ms=self._ttft_total_ms,
                ttft_count=self._ttft_total_n,
                completion_tokens_total=self._completion_tokens,
                prompt_tokens_total=self._prompt_tokens,
                decode_seconds_total=self._decode_s,
                last_tokens_per_s=self._last_tps,
            )


class ModelHost:
    """Serves the active model. `swap` replaces it at once; requests already running finish on the
    model they started with (they hold a reference to it).

    `submit` validates and takes a place in the bounded queue at once (raising InvalidRequest,
    NoModelLoaded or QueueFull in the caller's thread), then waits and generates in a worker of a
    pool as large as the queue bound, so threads never outnumber the places."""

    def __init__(self, *, queue_bound: int, limits: Limits, metrics: Metrics | None = None) -> None:
        self.queue = RequestQueue(queue_bound)
        self.limits = limits
        self.metrics = metrics or Metrics()
        self._model: LoadedModel | None = None
        self._lock = threading.Lock()
        self._listeners: list[Callable[[LoadedModel | None], None]] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=queue_bound, thread_name_prefix="slmops-gen")

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    def add_listener(self, callback: Callable[[LoadedModel | None], None]) -> None:
        self._listeners.append(callback)

    def swap(self, model: LoadedModel | None) -> LoadedModel | None:
        with self._lock:
            old, self._model = self._model, model
        if model is not None:
            log.info(
                "serving %s %s (%s) from slot %s",
                model.info.name,
                model.info.version,
                model.info.package_id[:12],
                model.info.slot,
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
    ) -> concurrent.futures.Future[GenerationResult]:
        """Validate and queue now (errors raise here); generate in a worker. `on_start` is told which
        model answers once the request has its turn; `cancel` stops it within one token."""
        started = time.perf_counter()
        cancel = cancel or threading.Event()
        self.metrics.request()
        try:
            validate_request(req, self.limits)
            if self._model is None:
                raise NoModelLoaded("no model is loaded yet (the device has not installed a package)")
            ticket = self.queue.admit()
        except BaseException as exc:
            self.metrics.outcome(status_name(exc))
            raise
        try:
            future = self._pool.submit(self._run, ticket, req, cancel, on_text, on_start, started)
        except RuntimeError as exc:  # the pool is shut down: the agent is stopping
            self.queue.release(ticket)
            self.metrics.outcome("UNAVAILABLE")
            raise NoModelLoaded("the agent is shutting down") from exc

        def never_ran(f: concurrent.futures.Future[GenerationResult]) -> None:
            if f.cancelled():  # cancelled before a worker picked it up: `_run` will not free the place
                self.queue.release(ticket)
                self.metrics.outcome("CANCELLED")

        future.add_done_callback(never_ran)
        return future

    def _run(
        self,
        ticket: Ticket,
        req: GenerationRequest,
        cancel: threading.Event,
        on_text: Callable[[str], None] | None,
        on_start: Callable[[ModelInfo], None] | None,
        started: float,
    ) -> GenerationResult:
        ran: float | None = None
        try:
            self.queue.wait(ticket, cancel)
            t0 = time.perf_counter()
            model = self._model
            if model is None:
                raise NoModelLoaded("no model is loaded")
            if req.model_version and req.model_version not in (model.info.version, model.info.package_id):
                raise NotFound(f"model version {req.model_version!r} is not active (active: {model.info.version})")
            if on_start is not None:
                on_start(model.info)
            result = model.generate(req, limits=self.limits, cancel=cancel, on_text=on_text, started=started)
            ran = time.perf_counter() - t0
        except BaseException as exc:
            code = _cancel_reason(cancel) if isinstance(exc, Cancelled) else status_name(exc)
            if code == "INTERNAL" and not isinstance(exc, AgentError):
                log.error("generation failed", exc_info=exc)
            self.metrics.outcome(code)
            raise
        finally:
            self.queue.release(ticket, ran_s=ran)
        self.metrics.outcome(_cancel_reason(cancel) if result.finish_reason is FinishReason.CANCELLED else "OK")
        self.metrics.result(result)
        return result

    def generate(
        self,
        req: GenerationRequest,
        *,
        cancel: threading.Event | None = None,
        on_text: Callable[[str], None] | None = None,
        on_start: Callable[[ModelInfo], None] | None = None,
    ) -> GenerationResult:
        """`submit` and wait for the result (blocking); if the wait is interrupted, the generation stops."""
        cancel = cancel or threading.Event()
        future = self.submit(req, cancel=cancel, on_text=on_text, on_start=on_start)
        try:
            return future.result()
        except BaseException:
            if not future.done():
                cancel.set()
            raise

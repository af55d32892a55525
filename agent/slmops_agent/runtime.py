"""The inference runtime: an onnxruntime-genai model loaded from a slot folder, and the host
that serves the active one (a bounded FIFO queue, one turn at a time: a request alone or a batch of
the requests waiting together, hot swap)."""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import contextlib
import enum
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

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
from slmops_agent.relay import FIRST_YIELD_S, GROUP_S

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


DEFAULT_MAX_BATCH = 4


@dataclass(frozen=True)
class _Prepared:
    """A request made ready for the model: its prompt tokens, its token budget and its search options."""

    ids: list[int]
    max_new: int
    options: dict[str, Any]


class _Decoding:
    """One request's side of the token loop: end of sequence, stop sequences, the budget, the text
    pieces handed to `on_text`, and the counts and timings of the result."""

    def __init__(
        self,
        model: LoadedModel,
        prepared: _Prepared,
        stop: tuple[str, ...],
        on_text: Callable[[str], None] | None,
        started: float,
    ) -> None:
        self.model = model
        self.prepared = prepared
        self.stream = model.tokenizer.create_stream()
        self.scanner = _StopScanner(stop)
        self.on_text = on_text
        self.t0 = started
        self.t_first = self.t_last = 0.0
        self.generated = 0
        self.finish = FinishReason.LENGTH
        self.done = False

    def feed(self, token: int) -> bool:
        """Take the next token; True when the request is complete (end of sequence, a stop, the budget)."""
        self.t_last = time.perf_counter()
        if self.generated == 0:
            self.t_first = self.t_last
        if token in self.model.eos_ids:
            self.finish = FinishReason.STOP
            self.done = True
            return True
        self.generated += 1
        out = self.scanner.feed(self.stream.decode(token))
        if out and self.on_text is not None:
            self.on_text(out)
        if self.scanner.stopped:
            self.finish = FinishReason.STOP
            self.done = True
        elif self.generated >= self.prepared.max_new:
            self.done = True
        return self.done

    def cancel(self) -> None:
        self.finish = FinishReason.CANCELLED
        self.done = True

    def result(self) -> GenerationResult:
        if self.finish is not FinishReason.STOP:
            rest = self.scanner.flush()
            if rest and self.on_text is not None:
                self.on_text(rest)
        t_end = time.perf_counter()
        decode_s = self.t_last - self.t_first
        n = self.generated
        return GenerationResult(
            text=self.scanner.text,
            finish_reason=self.finish,
            prompt_tokens=len(self.prepared.ids),
            completion_tokens=n,
            ttft_ms=(self.t_first - self.t0) * 1000 if self.t_first else 0.0,
            tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            total_ms=(t_end - self.t0) * 1000,
            model_version=self.model.info.version,
            package_id=self.model.info.package_id,
        )


@dataclass(frozen=True)
class BatchMember:
    """One request of a batch: `done` receives its result, or the error that ended it alone."""

    req: GenerationRequest
    cancel: threading.Event
    on_text: Callable[[str], None] | None
    started: float
    done: Callable[[GenerationResult | BaseException], None]


Spinning = bool | Literal["auto"]
SPIN_SAMPLE_S = 0.2
SPIN_MARGIN_CORES = 0.5


def others_busy_cores(interval: float = SPIN_SAMPLE_S) -> float:
    """How many cores the other processes of the machine keep busy, sampled over `interval` (this
    process's own CPU time taken out)."""
    import psutil

    me = psutil.Process()

    def sample() -> tuple[float, float]:
        t = psutil.cpu_times()
        own = me.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0), own.user + own.system

    busy0, own0 = sample()
    t0 = time.monotonic()
    time.sleep(interval)
    busy1, own1 = sample()
    elapsed = max(time.monotonic() - t0, 1e-3)
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / elapsed


def spinning_pays(threads: int, cores: int, others_busy: float) -> bool:
    """Spinning threads decode much faster on cores nobody else wants (SmolLM2 int4, 2 threads on 2
    idle cores: 135 vs 88 tokens/s) and collapse when another process wants one of them (57 vs 80
    with one busy process): spin only when every thread has a core the others leave free."""
    return cores - others_busy >= threads - SPIN_MARGIN_CORES


def resolve_spinning(spinning: Spinning, threads: int) -> bool:
    """`spinning` as a bool: "auto" decides now from how busy the machine's other processes are."""
    if spinning != "auto":
        return bool(spinning)
    if threads <= 1:  # no pool: nothing would spin
        return False
    return spinning_pays(threads, os.cpu_count() or 1, others_busy_cores())


class LoadedModel:
    """One slot folder loaded with onnxruntime-genai. Its host runs one generation or one batch on it at a time.

    `threads` is ONNX Runtime's intra-op pool; `spinning` lets those threads spin while they wait
    for work (much faster on idle cores, a collapse when another process wants them); "auto" (the
    agent's default) decides at load time (`resolve_spinning`). `max_batch` > 1 lets
    `generate_batch` decode that many requests together through onnxruntime-genai's Engine (its
    static batching: requests join when a batch starts)."""

    def __init__(
        self,
        path: Path,
        info: ModelInfo,
        *,
        threads: int,
        spinning: Spinning = False,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        og = _genai()
        self.path = path
        self.info = info
        self.threads = threads
        self.spinning = resolve_spinning(spinning, threads)
        try:
            genai_config = json.loads((path / "genai_config.json").read_text())
            cfg = og.Config(str(path))
            spin = "1" if self.spinning else "0"
            session = {"intra_op_num_threads": threads, "session.intra_op.allow_spinning": spin}
            overlay: dict[str, Any] = {"model": {"decoder": {"session_options": session}}}
            self.max_batch = max_batch if hasattr(og, "Engine") else 1
            if self.max_batch > 1:
                overlay["engine"] = {"static_batching": {"max_batch_size": self.max_batch}}
            cfg.overlay(json.dumps(overlay))
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

    def batchable(self, req: GenerationRequest) -> bool:
        """Whether `req` may share a batch: the Engine has no adapters and, in static batching, no per-request seed."""
        return self.max_batch > 1 and not req.adapter and req.seed is None

    def prepare(self, req: GenerationRequest, limits: Limits) -> _Prepared:
        """Check what needs the model (adapter, context) and translate the sampling fields."""
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
        return _Prepared(ids, max_new, options)

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
        prepared = self.prepare(req, limits)
        params = og.GeneratorParams(self.model)
        try:
            params.set_search_options(**prepared.options)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise InvalidRequest(f"onnxruntime-genai refused the search options: {exc}") from exc
        generator = og.Generator(self.model, params)
        if req.adapter:
            generator.set_active_adapter(self.adapters, req.adapter)
        decoding = _Decoding(self, prepared, req.stop, on_text, t0)
        if cancel.is_set():
            decoding.cancel()
        else:
            generator.append_tokens(prepared.ids)
        while not decoding.done and not generator.is_done():
            if cancel.is_set():
                decoding.cancel()
                break
            generator.generate_next_token()
            decoding.feed(int(generator.get_next_tokens()[0]))
        return decoding.result()

    def generate_batch(self, members: list[BatchMember], *, limits: Limits) -> None:
        """Decode `members` together (each must be `batchable`); every member's `done` is called once,
        when it ends: its result, or the error that ended it (an error of one does not end the others).
        The batch gets an Engine of its own: an Engine answers only the thread that made it, and
        making one costs microseconds. A model the Engine refuses stops batching: the members run
        one after the other."""
        try:
            engine = _genai().Engine(self.model)
        except RuntimeError as exc:
            log.warning("onnxruntime-genai's Engine refuses %s, so it will not batch: %s", self.path, exc)
            self.max_batch = 1
            engine = None
        if engine is not None:
            _BatchRun(self, engine, members, limits).run()
            return
        for member in members:
            try:
                result = self.generate(
                    member.req, limits=limits, cancel=member.cancel, on_text=member.on_text, started=member.started
                )
            except Exception as exc:
                member.done(exc)
            else:
                member.done(result)


class _BatchRun:
    """One static batch on the model's Engine: each member a Request with its own turn options."""

    def __init__(self, model: LoadedModel, engine: Any, members: list[BatchMember], limits: Limits) -> None:
        self.model = model
        self.engine = engine
        self.members = members
        self.limits = limits
        self.live: list[tuple[BatchMember, _Decoding, Any, int]] = []  # member, decoding, Request, turn id
        self.ended: set[int] = set()  # ids of the members whose `done` was called

    def end(self, member: BatchMember, outcome: GenerationResult | BaseException) -> None:
        if id(member) not in self.ended:
            self.ended.add(id(member))
            member.done(outcome)

    def start(self, member: BatchMember) -> None:
        og = _genai()
        prepared = self.model.prepare(member.req, self.limits)
        decoding = _Decoding(self.model, prepared, member.req.stop, member.on_text, member.started)
        if member.cancel.is_set():
            decoding.cancel()
            self.end(member, decoding.result())
            return
        request_options = og.RequestOptions()
        request_options.set_max_session_tokens(len(prepared.ids) + prepared.max_new)
        request = self.engine.create_request(options=request_options)
        turn = og.TurnOptions(request)
        opts = prepared.options
        turn.set_max_generated_tokens(prepared.max_new)
        try:
            if "do_sample" in opts:
                turn.set_do_sample(opts["do_sample"])
            if "temperature" in opts:
                turn.set_temperature(opts["temperature"])
            if "top_p" in opts:
                turn.set_top_p(opts["top_p"])
            if "top_k" in opts:
                turn.set_top_k(opts["top_k"])
            if "repetition_penalty" in opts:
                turn.set_repetition_penalty(opts["repetition_penalty"])
            turn_id = request.begin_turn(np.asarray(prepared.ids, dtype=np.int32), turn)
        except (RuntimeError, ValueError, TypeError) as exc:
            request.close()
            raise InvalidRequest(f"onnxruntime-genai refused the search options: {exc}") from exc
        self.live.append((member, decoding, request, turn_id))

    def run(self) -> None:
        og = _genai()
        token_flag, finished_flag, failed_flag = (
            og.EngineEventFlags.TOKEN,
            og.EngineEventFlags.TURN_FINISHED,
            og.EngineEventFlags.FAILED,
        )
        try:
            for member in self.members:
                try:
                    self.start(member)
                except Exception as exc:
                    self.end(member, exc)
            if not self.live:
                return
            engine = self.engine
            by_request = {
                id(request): (member, decoding, request, turn) for member, decoding, request, turn in self.live
            }
            events = engine.create_event_buffer(2 * len(self.live) + 8)
            while engine.has_pending_requests():
                for member, decoding, request, turn in self.live:
                    if not decoding.done and member.cancel.is_set():
                        decoding.cancel()
                        request.cancel_turn(turn)
                        self.end(member, decoding.result())
                engine.run(events)
                for i in range(len(events)):
                    event = events[i]
                    member, decoding, request, turn = by_request[id(event.request)]
                    if id(member) in self.ended:
                        continue  # stopped by us; the Engine reports its cancelled turn
                    flags = event.flags
                    if flags & failed_flag:
                        self.end(member, AgentError(f"onnxruntime-genai failed the request: {event.error_code.name}"))
                        continue
                    try:
                        if flags & token_flag and decoding.feed(int(event.token)) and not flags & finished_flag:
                            request.cancel_turn(turn)  # a stop sequence, end of sequence or our budget
                    except Exception as exc:  # the member's own callback failed: it alone ends
                        request.cancel_turn(turn)
                        self.end(member, exc)
                        continue
                    if decoding.done or flags & finished_flag:
                        self.end(member, decoding.result())
        except Exception as exc:
            for member in self.members:
                self.end(member, exc)
        finally:
            for _, _, request, _ in self.live:
                with contextlib.suppress(RuntimeError):
                    request.close()


def load_model(
    path: Path, info: ModelInfo, *, threads: int, spinning: Spinning = False, max_batch: int = DEFAULT_MAX_BATCH
) -> LoadedModel:
    return LoadedModel(path, info, threads=threads, spinning=spinning, max_batch=max_batch)


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
    """A place in the queue: waiting, then running (alone, at the head of a batch, or in another's
    batch), then done. `job` is what the holder asked for (the host's; the queue only carries it)."""

    __slots__ = ("admitted", "finished", "job", "outcome", "started", "state")

    def __init__(self, job: Any = None) -> None:
        self.admitted = time.monotonic()
        self.job = job
        self.state = "waiting"
        self.started = 0.0
        self.finished = threading.Event()
        self.outcome: Any = None


class RequestQueue:
    """A bounded FIFO of requests. One turn runs at a time: a request alone, or a batch that its head
    takes from the front of the queue (only requests the head's `fits` accepts, stopping at the first
    it refuses, so nobody is overtaken). Past the bound: QueueFull, with a retry hint from the recent
    time per request."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._cond = threading.Condition()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._running = 0
        self._turn_ms = 0.0  # moving average of the time a turn takes
        self._last_batch = 1  # size of the latest batch
        self._arrivals = 0  # requests admitted while the latest batch ran
        self._last_end = 0.0  # when the queue last fell idle (monotonic)

    @property
    def depth(self) -> int:
        """Requests waiting or running."""
        return len(self._waiting) + self._running

    def retry_after_ms(self) -> int:
        """When a place is likely free: after the running turn, so the recent mean turn (1 s before
        any), within [50 ms, 60 s]."""
        return int(min(60_000.0, max(50.0, self._turn_ms or 1000.0)))

    def admit(self, job: Any = None) -> Ticket:
        """Take a place at the end of the queue or raise QueueFull at once."""
        with self._cond:
            depth = self.depth
            if depth >= self.bound:
                raise QueueFull(
                    f"{depth} requests are queued (the bound is {self.bound}); retry later",
                    retry_after_ms=self.retry_after_ms(),
                )
            ticket = Ticket(job)
            self._waiting.append(ticket)
            if self._running:
                self._arrivals += 1
            self._cond.notify_all()  # a head lingering for its batch
            return ticket

    def start(
        self,
        ticket: Ticket,
        cancel: threading.Event,
        *,
        fits: Callable[[Ticket], bool] | None = None,
        max_batch: int = 1,
        linger_s: float = 0.0,
    ) -> list[Ticket] | None:
        """Block until `ticket` runs. At the front with nothing running, it heads a turn: the returned
        batch is `ticket` and up to `max_batch` - 1 followers from the front of the queue that `fits`
        accepts. When the latest batch had several members and the queue fell idle just now, the head
        waits up to `linger_s` for as many as it had plus those that arrived while it ran (the clients
        of a batch come back together). None: another head took `ticket` into its batch. Cancelled if
        `cancel` is set while waiting."""
        with self._cond:
            while ticket.state == "waiting" and not (self._running == 0 and self._waiting[0] is ticket):
                if cancel.is_set():
                    raise Cancelled("cancelled while waiting in the queue")
                self._cond.wait(0.02)
            if ticket.state != "waiting":
                return None
            batch = [self._take()]
            if max_batch > 1 and fits is not None and fits(ticket):
                now = time.monotonic()
                want = min(max_batch, self._last_batch + self._arrivals)
                deadline = now + linger_s if want > 1 and now - self._last_end < 0.1 else now
                while len(batch) < max_batch:
                    if self._waiting and fits(self._waiting[0]):
                        batch.append(self._take())
                        continue
                    now = time.monotonic()
                    if self._waiting or len(batch) >= want or now >= deadline:
                        break
                    self._cond.wait(deadline - now)
            self._last_batch = len(batch)
            self._arrivals = 0
            self._cond.notify_all()  # the followers' holders
            return batch

    def _take(self) -> Ticket:
        ticket = self._waiting.popleft()
        ticket.state = "running"
        ticket.started = time.perf_counter()
        self._running += 1
        return ticket

    def release(self, ticket: Ticket, *, measure: bool = True) -> None:
        """Free the place (once; later calls do nothing). A turn that ran is measured for the retry hint."""
        with self._cond:
            if ticket.state == "waiting":
                self._waiting.remove(ticket)
            elif ticket.state == "running":
                self._running -= 1
                if measure:
                    ms = (time.perf_counter() - ticket.started) * 1000
                    self._turn_ms = ms if not self._turn_ms else 0.8 * self._turn_ms + 0.2 * ms
                if self._running == 0:
                    self._last_end = time.monotonic()
            ticket.state = "done"
            self._cond.notify_all()

    @contextmanager
    def turn(self, cancel: threading.Event) -> Iterator[None]:
        """Hold a turn alone (no batch) for the duration of the block."""
        ticket = self.admit()
        ok = False
        try:
            self.start(ticket, cancel)
            yield
            ok = True
        finally:
            self.release(ticket, measure=ok)


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
    batches_total: int
    batched_requests_total: int


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
    _batches: int = 0
    _batched_requests: int = 0
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

    def batch(self, size: int) -> None:
        """A batch of `size` (> 1) requests started."""
        with self._lock:
            self._batches += 1
            self._batched_requests += size

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
                batches_total=self._batches,
                batched_requests_total=self._batched_requests,
            )


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
        limits: Limits,
        metrics: Metrics | None = None,
        batch_linger_s: float = 0.02,
        stream_group_s: float = GROUP_S,
    ) -> None:
        self.queue = RequestQueue(queue_bound)
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
            ticket = self.queue.admit(_Job(req, cancel, on_text, on_start, started))
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
        return model is not None and model.batchable(ticket.job.req)

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
            code = _cancel_reason(job.cancel) if isinstance(exc, Cancelled) else status_name(exc)
            if code == "INTERNAL" and not isinstance(exc, AgentError):
                log.error("generation failed", exc_info=exc)
            self.metrics.outcome(code)
            raise
        finally:
            self.queue.release(ticket, measure=False)  # a request that never ran; no-op once ended
        self.metrics.outcome(_cancel_reason(job.cancel) if result.finish_reason is FinishReason.CANCELLED else "OK")
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
                    job.req, limits=self.limits, cancel=job.cancel, on_text=job.on_text, started=job.started
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
        )

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

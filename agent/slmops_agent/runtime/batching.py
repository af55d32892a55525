"""Static batching: several requests decoded together on onnxruntime-genai's Engine, each one
streaming, stopping and being cancelled on its own."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from slmops_agent.errors import AgentError, InvalidRequest
from slmops_agent.runtime.constraints import guidance_refused, is_guidance_error
from slmops_agent.runtime.decoding import Decoding
from slmops_agent.runtime.genai import load_genai
from slmops_agent.runtime.requests import GenerationRequest, GenerationResult, Limits

if TYPE_CHECKING:
    from slmops_agent.runtime.model import LoadedModel


@dataclass(frozen=True)
class BatchMember:
    """One request of a batch: `done` receives its result, or the error that ended it alone."""

    req: GenerationRequest
    cancel: threading.Event
    on_text: Callable[[str], None] | None
    started: float
    done: Callable[[GenerationResult | BaseException], None]


class BatchRun:
    """One static batch on the model's Engine: each member a Request with its own turn options."""

    def __init__(
        self,
        model: LoadedModel,
        engine: Any,
        members: list[BatchMember],
        limits: Limits,
        pause: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        self.pause = pause  # between engine steps: the queue's turn-taking
        self.engine = engine
        self.members = members
        self.limits = limits
        self.live: list[tuple[BatchMember, Decoding, Any, int]] = []  # member, decoding, Request, turn id
        self.ended: set[int] = set()  # ids of the members whose `done` was called

    def end(self, member: BatchMember, outcome: GenerationResult | BaseException) -> None:
        if id(member) not in self.ended:
            self.ended.add(id(member))
            member.done(outcome)

    def start(self, member: BatchMember) -> None:
        og = load_genai()
        prepared = self.model.prepare(member.req, self.limits)
        decoding = Decoding(self.model, prepared, member.req.stop, member.on_text, member.started)
        if member.cancel.is_set():
            decoding.cancel()
            self.end(member, decoding.result())
            return
        request_options = og.RequestOptions()
        request_options.set_max_session_tokens(len(prepared.ids) + prepared.max_new)
        request = self.engine.create_request(options=request_options)
        turn = og.TurnOptions(request)
        opts = prepared.options
        constraint = member.req.constraint
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
            import numpy as np  # onnxruntime-genai needs it; an idle agent does not (footprint)

            if constraint is not None:
                turn.set_guidance(constraint.kind.value, constraint.text)  # turn-scoped: mixes with unguided turns
            turn_id = request.begin_turn(np.asarray(prepared.ids, dtype=np.int32), turn)  # compiles it
        except (RuntimeError, ValueError, TypeError) as exc:
            request.close()
            if constraint is not None and is_guidance_error(exc):
                raise guidance_refused(constraint, exc) from exc
            raise InvalidRequest(f"onnxruntime-genai refused the search options: {exc}") from exc
        self.live.append((member, decoding, request, turn_id))

    def run(self) -> None:
        og = load_genai()
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
                if self.pause is not None:
                    self.pause()
        except Exception as exc:
            for member in self.members:
                self.end(member, exc)
        finally:
            for _, _, request, _ in self.live:
                with contextlib.suppress(RuntimeError):
                    request.close()

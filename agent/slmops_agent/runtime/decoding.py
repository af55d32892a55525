"""One request's side of the token loop, shared by a lone generation and a batch: end of sequence,
stop sequences, the token budget, the streamed text pieces, and the result's counts and timings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from slmops_agent.runtime.requests import FinishReason, GenerationResult
from slmops_agent.runtime.stops import StopScanner

if TYPE_CHECKING:
    from slmops_agent.runtime.model import LoadedModel


@dataclass(frozen=True)
class Prepared:
    """A request made ready for the model: its prompt tokens, its token budget and its search options."""

    ids: list[int]
    max_new: int
    options: dict[str, Any]


class Decoding:
    """One request's side of the token loop: end of sequence, stop sequences, the budget, the text
    pieces handed to `on_text`, and the counts and timings of the result."""

    def __init__(
        self,
        model: LoadedModel,
        prepared: Prepared,
        stop: tuple[str, ...],
        on_text: Callable[[str], None] | None,
        started: float,
    ) -> None:
        self.model = model
        self.prepared = prepared
        self.stream = model.tokenizer.create_stream()
        self.scanner = StopScanner(stop)
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

"""The loaded model: one slot folder opened with onnxruntime-genai, its tokenizer and adapters, and
the token loop of one request (a batch goes to `batching`)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from slmops_agent.errors import InvalidRequest, ModelLoadError, NotFound
from slmops_agent.runtime.batching import BatchMember, BatchRun
from slmops_agent.runtime.constraints import guidance_refused, is_guidance_error
from slmops_agent.runtime.decoding import Decoding, Prepared
from slmops_agent.runtime.genai import load_genai
from slmops_agent.runtime.memory import release_memory
from slmops_agent.runtime.requests import GenerationRequest, GenerationResult, Limits
from slmops_agent.runtime.spinning import Spinning, resolve_spinning

log = logging.getLogger(__name__)


DEFAULT_MAX_BATCH = 4
DEFAULT_CONTEXT = 2048  # tokens a sequence may hold when the settings name none (the model's, if shorter)
MIB = 1024 * 1024
Int4Compute = Literal["int8", "fp32"]


def kv_bytes_per_token(decoder: dict[str, Any]) -> int:
    """Bytes of KV cache one token of one sequence takes: keys and values of every layer (fp32 on
    CPU, fp16 when the model's KV inputs are; genai_config.json's decoder section)."""
    heads = int(decoder.get("num_key_value_heads") or decoder.get("num_attention_heads") or 0)
    itemsize = 2 if "fp16" in json.dumps(decoder.get("inputs", {})).lower() else 4
    return 2 * int(decoder.get("num_hidden_layers") or 0) * heads * int(decoder.get("head_size") or 0) * itemsize


def effective_context(model_context: int, configured: int | None) -> int:
    """The context this agent serves: `configured` (refused past the model's own), else the model's
    capped at DEFAULT_CONTEXT (each sequence's KV cache grows to it: memory a small device lacks)."""
    if configured is None:
        return min(model_context, DEFAULT_CONTEXT)
    if configured > model_context:
        raise ModelLoadError(f"context_length {configured} is longer than the model's context ({model_context} tokens)")
    return configured


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


class LoadedModel:
    """One slot folder loaded with onnxruntime-genai. Its host runs one generation or one batch on it at a time.

    `threads` is ONNX Runtime's intra-op pool; `spinning` lets those threads spin while they wait
    for work (much faster on idle cores, a collapse when another process wants them); "auto" (the
    agent's default) decides at load time (`resolve_spinning`). `max_batch` > 1 lets
    `generate_batch` decode that many requests together through onnxruntime-genai's Engine (its
    static batching: requests join when a batch starts). `cpu_arena`: onnxruntime's CPU arena (off:
    a turn's memory goes back when it ends, `memory.release_memory`). `int4_compute`: how int4
    MatMuls compute, "int8" (the builder's accuracy level 4: activations quantized to int8) or
    "fp32" (onnxruntime's `mlas.qnbit.force_fp32`: the weights' prepacked copy is smaller, decoding
    slower; benchmarks/prepack_bench.py). `context_length` caps a sequence's prompt
    and new tokens (and so its KV cache; `effective_context`); the model's generation defaults'
    max_length is capped to it too."""

    def __init__(
        self,
        path: Path,
        info: ModelInfo,
        *,
        threads: int,
        spinning: Spinning = False,
        max_batch: int = DEFAULT_MAX_BATCH,
        context_length: int | None = None,
        cpu_arena: bool = False,
        int4_compute: Int4Compute = "int8",
    ) -> None:
        og = load_genai()
        self.path = path
        self.info = info
        self.threads = threads
        self.spinning = resolve_spinning(spinning, threads)
        try:
            genai_config = json.loads((path / "genai_config.json").read_text())
            model_cfg = genai_config.get("model", {})
            self.model_context = int(model_cfg.get("context_length") or 2048)
            self.context_length = effective_context(self.model_context, context_length)
            cfg = og.Config(str(path))
            spin = "1" if self.spinning else "0"
            session: dict[str, Any] = {
                "intra_op_num_threads": threads,
                "session.intra_op.allow_spinning": spin,
                "enable_cpu_mem_arena": cpu_arena,
            }
            if int4_compute == "fp32":  # int4 MatMuls in fp32: a smaller prepacked copy, slower decode
                session["mlas.qnbit.force_fp32"] = "1"
            overlay: dict[str, Any] = {
                "model": {"decoder": {"session_options": session}},
                "search": {"max_length": self.context_length},
            }
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
        release_memory()  # the load's temporaries (the tokenizer's parsed JSON: ~14 MiB for SmolLM2)
        self.kv_bytes_per_token = kv_bytes_per_token(model_cfg.get("decoder", {}))
        log.info(
            "%s: context %d tokens (the model's: %d) x %d batch slots: KV cache up to %.0f MiB (%.1f KiB a token)",
            info.name or path.name,
            self.context_length,
            self.model_context,
            self.max_batch,
            self.kv_cache_bytes / MIB,
            self.kv_bytes_per_token / 1024,
        )
        self.vocab_size = int(model_cfg.get("vocab_size") or 0)  # 0: unknown
        eos = model_cfg.get("eos_token_id", [])
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [eos])
        self.eos_ids.update(int(t) for t in self.tokenizer.eos_token_ids)

    @property
    def kv_cache_bytes(self) -> int:
        """The KV cache's memory when every batch slot holds a full context."""
        return self.kv_bytes_per_token * self.context_length * self.max_batch

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

    def prepare(self, req: GenerationRequest, limits: Limits) -> Prepared:
        """Check what needs the model (adapter, context) and translate the sampling fields."""
        if req.adapter and (self.adapters is None or req.adapter not in self.info.adapters):
            have = ", ".join(self.info.adapters) or "none"
            raise NotFound(f"adapter {req.adapter!r} is not loaded (this model has: {have})")
        ids = self.encode(req)
        if len(ids) >= self.context_length:
            whose = "the model's" if self.context_length == self.model_context else "the agent's (context_length)"
            raise InvalidRequest(f"the prompt is {len(ids)} tokens; {whose} context is {self.context_length}")
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
        return Prepared(ids, max_new, options)

    def generate(
        self,
        req: GenerationRequest,
        *,
        limits: Limits,
        cancel: threading.Event | None = None,
        on_text: Callable[[str], None] | None = None,
        started: float | None = None,
        pause: Callable[[], None] | None = None,
    ) -> GenerationResult:
        """Run the token loop; call `on_text` with each decoded piece; stop within one token of
        `cancel`; call `pause` between tokens (the queue's turn-taking)."""
        og = load_genai()
        t0 = started if started is not None else time.perf_counter()
        cancel = cancel or threading.Event()
        prepared = self.prepare(req, limits)
        params = og.GeneratorParams(self.model)
        try:
            params.set_search_options(**prepared.options)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise InvalidRequest(f"onnxruntime-genai refused the search options: {exc}") from exc
        constraint = req.constraint
        if constraint is not None:
            params.set_guidance(constraint.kind.value, constraint.text)
        try:
            generator = og.Generator(self.model, params)  # compiles the constraint, before any token
        except RuntimeError as exc:
            if constraint is not None and is_guidance_error(exc):
                raise guidance_refused(constraint, exc) from exc
            raise
        if req.adapter:
            generator.set_active_adapter(self.adapters, req.adapter)
        decoding = Decoding(self, prepared, req.stop, on_text, t0)
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
            if pause is not None and not decoding.done:
                pause()
        del generator, params
        release_memory()
        return decoding.result()

    def generate_batch(
        self, members: list[BatchMember], *, limits: Limits, pause: Callable[[], None] | None = None
    ) -> None:
        """Decode `members` together (each must be `batchable`); every member's `done` is called once,
        when it ends: its result, or the error that ended it (an error of one does not end the others).
        The batch gets an Engine of its own: an Engine answers only the thread that made it, and
        making one costs microseconds. A model the Engine refuses stops batching: the members run
        one after the other."""
        try:
            engine = load_genai().Engine(self.model)
        except RuntimeError as exc:
            log.warning("onnxruntime-genai's Engine refuses %s, so it will not batch: %s", self.path, exc)
            self.max_batch = 1
            engine = None
        if engine is not None:
            BatchRun(self, engine, members, limits, pause).run()
            del engine
            release_memory()
            return
        for member in members:
            try:
                result = self.generate(
                    member.req,
                    limits=limits,
                    cancel=member.cancel,
                    on_text=member.on_text,
                    started=member.started,
                    pause=pause,
                )
            except Exception as exc:
                member.done(exc)
            else:
                member.done(result)


def load_model(
    path: Path,
    info: ModelInfo,
    *,
    threads: int,
    spinning: Spinning = False,
    max_batch: int = DEFAULT_MAX_BATCH,
    context_length: int | None = None,
    cpu_arena: bool = False,
    int4_compute: Int4Compute = "int8",
) -> LoadedModel:
    return LoadedModel(
        path,
        info,
        threads=threads,
        spinning=spinning,
        max_batch=max_batch,
        context_length=context_length,
        cpu_arena=cpu_arena,
        int4_compute=int4_compute,
    )

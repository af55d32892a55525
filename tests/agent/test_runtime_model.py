"""The onnxruntime-genai runtime on the real tiny model."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import load_unpacked

from slmops_agent.errors import InvalidRequest, ModelLoadError, NoModelLoaded, NotFound
from slmops_agent.runtime.host import ModelHost
from slmops_agent.runtime.model import LoadedModel, ModelInfo, load_model
from slmops_agent.runtime.requests import FinishReason, GenerationRequest, Limits

LIMITS = Limits(default_max_new_tokens=12, max_new_tokens_limit=200)


def test_chat_generation_streams_pieces_that_make_the_text(model: LoadedModel) -> None:
    pieces: list[str] = []
    result = model.generate(
        GenerationRequest(messages=(("user", "What is the capital of France?"),), max_new_tokens=10),
        limits=LIMITS,
        on_text=pieces.append,
    )
    assert result.completion_tokens == 10 and result.finish_reason is FinishReason.LENGTH
    assert "".join(pieces) == result.text and result.text.strip()
    assert result.prompt_tokens > 5 and result.ttft_ms > 0 and result.tokens_per_s > 0
    assert result.total_ms >= result.ttft_ms
    assert result.model_version == "1.0.0"


def test_greedy_is_deterministic_and_sampling_follows_the_seed(model: LoadedModel) -> None:
    req = GenerationRequest(prompt="The capital of", max_new_tokens=8)
    assert model.generate(req, limits=LIMITS).text == model.generate(req, limits=LIMITS).text
    sampled = GenerationRequest(prompt="The capital of", max_new_tokens=16, temperature=1.5, top_k=50, seed=11)
    a = model.generate(sampled, limits=LIMITS).text
    assert a == model.generate(sampled, limits=LIMITS).text


def test_unset_sampling_fields_follow_the_package_defaults(tiny_package_factory: Any, tmp_path: Path) -> None:
    """A package whose genai_config.json says "sample at 1.5" samples when the request leaves the
    temperature unset, and decodes greedily when it asks for temperature 0."""
    pkg = tiny_package_factory("1.0.1", search={"do_sample": True, "temperature": 1.5, "top_k": 50}, out=tmp_path / "p")
    (tmp_path / "unpacked").mkdir()
    sampling = load_unpacked(pkg, tmp_path / "unpacked")
    greedy = GenerationRequest(prompt="The capital of", max_new_tokens=16, temperature=0.0)
    greedy_text = sampling.generate(greedy, limits=LIMITS).text
    assert greedy_text == sampling.generate(greedy, limits=LIMITS).text
    texts = {
        sampling.generate(GenerationRequest(prompt="The capital of", max_new_tokens=16, seed=s), limits=LIMITS).text
        for s in range(4)
    }
    assert len(texts) > 1 and texts != {greedy_text}


def test_default_max_new_tokens_and_stop_sequences(model: LoadedModel) -> None:
    result = model.generate(GenerationRequest(prompt="Hello"), limits=LIMITS)
    assert result.completion_tokens == LIMITS.default_max_new_tokens
    full = model.generate(GenerationRequest(prompt="Hello", max_new_tokens=20), limits=LIMITS).text
    assert len(full) >= 10
    stop = full[6:9]  # a stop sequence that first occurs after some text
    pieces: list[str] = []
    cut = model.generate(
        GenerationRequest(prompt="Hello", max_new_tokens=20, stop=(stop,)), limits=LIMITS, on_text=pieces.append
    )
    assert cut.finish_reason is FinishReason.STOP
    assert cut.text == full[: full.index(stop)] and "".join(pieces) == cut.text
    assert cut.completion_tokens < 20


def test_cancel_stops_within_one_token(model: LoadedModel) -> None:
    cancel = threading.Event()
    seen: list[str] = []

    def on_text(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 3:
            cancel.set()

    result = model.generate(
        GenerationRequest(prompt="Hello", max_new_tokens=150), limits=LIMITS, cancel=cancel, on_text=on_text
    )
    assert result.finish_reason is FinishReason.CANCELLED
    assert result.completion_tokens <= 4


def test_prompt_longer_than_the_context_is_invalid(model: LoadedModel) -> None:
    with pytest.raises(InvalidRequest, match="context"):
        model.generate(GenerationRequest(prompt="Hello world " * 400), limits=LIMITS)


def test_unknown_adapter_is_not_found(model: LoadedModel) -> None:
    with pytest.raises(NotFound, match="adapter 'fr'"):
        model.generate(GenerationRequest(prompt="hi", adapter="fr"), limits=LIMITS)


def test_host_without_a_model_and_with_a_pinned_version(model: LoadedModel) -> None:
    host = ModelHost(queue_bound=2, limits=LIMITS)
    with pytest.raises(NoModelLoaded):
        host.generate(GenerationRequest(prompt="hi"))
    host.swap(model)
    assert host.generate(GenerationRequest(prompt="hi", model_version="1.0.0", max_new_tokens=2)).completion_tokens == 2
    with pytest.raises(NotFound, match="not active"):
        host.generate(GenerationRequest(prompt="hi", model_version="9.9.9"))
    assert host.metrics.requests_total == 3 and host.metrics.errors_total == 1  # not-found is the caller's error


def test_hot_swap_lets_the_running_request_finish_on_the_old_model(model: LoadedModel, pkg_v1: Path) -> None:
    host = ModelHost(queue_bound=2, limits=LIMITS)
    host.swap(model)
    other = LoadedModel(model.path, ModelInfo(name="tiny", version="2.0.0", slot="b"), threads=1)
    started = threading.Event()
    results = []

    def slow(piece: str) -> None:
        started.set()
        time.sleep(0.01)

    t = threading.Thread(
        target=lambda: results.append(host.generate(GenerationRequest(prompt="hi", max_new_tokens=40), on_text=slow))
    )
    t.start()
    assert started.wait(10)
    host.swap(other)
    after = host.generate(GenerationRequest(prompt="hi", max_new_tokens=2))
    t.join(30)
    assert results[0].model_version == "1.0.0" and results[0].completion_tokens == 40
    assert after.model_version == "2.0.0"


def test_a_folder_that_is_not_a_model_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"genai_config\.json"):
        load_model(tmp_path, ModelInfo(), threads=1)

"""The agent's footprint: the context and batch slots that size the KV cache (validated against the
model), memory given back after a turn, and the libraries an idle agent does not import."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from slmops_agent.errors import InvalidRequest, ModelLoadError
from slmops_agent.inventory import PROVIDERS_CACHE, collect_inventory, onnxruntime_providers
from slmops_agent.runtime.memory import release_memory
from slmops_agent.runtime.model import DEFAULT_CONTEXT, LoadedModel, effective_context
from slmops_agent.runtime.requests import FinishReason, GenerationRequest, Limits
from slmops_agent.settings import AgentSettings, SettingsValidationError

LIMITS = Limits(default_max_new_tokens=12, max_new_tokens_limit=200)


def test_a_context_longer_than_the_models_is_refused_with_the_limit(model: LoadedModel) -> None:
    too_long = model.model_context + 1
    with pytest.raises(
        ModelLoadError, match=rf"context_length {too_long} .*the model's context \({model.model_context} "
    ):
        LoadedModel(model.path, model.info, threads=1, context_length=too_long)


def test_the_default_context_is_the_models_capped_for_a_small_device() -> None:
    assert effective_context(8192, None) == DEFAULT_CONTEXT == 2048
    assert effective_context(256, None) == 256
    assert effective_context(8192, 512) == 512


def test_context_length_bounds_prompt_and_new_tokens(model: LoadedModel, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="slmops_agent.runtime.model"):
        small = LoadedModel(model.path, model.info, threads=1, context_length=32, max_batch=2)
    assert small.context_length == 32 and small.model_context == model.model_context
    assert small.kv_cache_bytes == small.kv_bytes_per_token * 32 * small.max_batch > 0
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "context 32 tokens" in logged and "batch slots: KV cache up to" in logged
    with pytest.raises(InvalidRequest, match=r"the agent's \(context_length\) context is 32"):
        small.prepare(GenerationRequest(prompt="Hello world " * 40), LIMITS)
    result = small.generate(GenerationRequest(prompt="The capital of", max_new_tokens=200), limits=LIMITS)
    assert result.prompt_tokens + result.completion_tokens <= 32
    assert result.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)


def test_int4_matmuls_may_compute_in_fp32(model: LoadedModel) -> None:
    """`int4_compute = "fp32"` loads the model with onnxruntime's fp32 int4 kernels (a smaller
    prepacked copy: prepack_bench.py) and generates; the setting reaches the model's options."""
    fp32 = LoadedModel(model.path, model.info, threads=1, int4_compute="fp32")
    request = GenerationRequest(prompt="The capital of", max_new_tokens=8, temperature=0.0)
    result = fp32.generate(request, limits=LIMITS)
    assert result.completion_tokens > 0 and result.prompt_tokens > 0
    assert AgentSettings(int4_compute="fp32").model_options()["int4_compute"] == "fp32"


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("context_length", 8, "greater than or equal to 16"),
        ("context_length", "long", "valid integer"),
        ("max_batch", 0, "greater than or equal to 1"),
        ("cpu_arena", "sometimes", "valid boolean"),
        ("malloc_arenas", -1, "greater than or equal to 0"),
        ("int4_compute", "int16", "'int8' or 'fp32'"),
    ],
)
def test_the_memory_settings_are_validated(key: str, value: object, error: str) -> None:
    with pytest.raises(SettingsValidationError, match=error):
        AgentSettings(**{key: value})


def test_the_memory_settings_defaults_fit_a_small_device() -> None:
    s = AgentSettings()
    assert s.context_length is None and s.max_batch == 4 and s.cpu_arena is False and s.malloc_arenas == 2


def test_memory_is_given_back_where_the_c_library_can() -> None:
    assert release_memory() is (sys.platform == "linux")


IDLE_AGENT = """
import asyncio, json, sys, tempfile, urllib.request
from slmops_agent.cli import _settings
from slmops_agent.daemon import Agent

HEAVY = {heavy!r}
state = tempfile.mkdtemp()
agent = Agent(_settings(state_dir=state, grpc_address="127.0.0.1:0"))
seen = {{}}


def ready(addresses):
    seen["idle"] = [m for m in HEAVY if m in sys.modules]
    url = next(a for a in addresses if a.startswith("http"))
    def scrape():
        with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
            seen["status"] = response.status
            seen["body"] = response.read().decode()
        agent.request_stop()
    asyncio.get_running_loop().run_in_executor(None, scrape)


asyncio.run(agent.serve(ready, signals=False))
seen["after_http"] = [m for m in HEAVY if m in sys.modules]
print(json.dumps(seen))
"""


def test_an_idle_agent_imports_no_library_it_does_not_use_yet() -> None:
    """A real agent (no model, not enrolled, HTTP on) serves without numpy, the native runtime,
    cryptography, pydantic, the HTTP stack, Prometheus, paho, sqlite or rich: each comes when its
    feature is first used; the first HTTP connection brings the HTTP stack and is answered."""
    heavy = [
        "numpy",
        "onnxruntime",
        "onnxruntime_genai",
        "cryptography",
        "pydantic",
        "pydantic_settings",
        "starlette",
        "uvicorn",
        "prometheus_client",
        "paho",
        "sqlite3",
        "slmops_agent.openai_api",
        "rich",
    ]
    code = IDLE_AGENT.format(heavy=heavy)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["idle"] == []
    assert seen["status"] == 200 and "slmops_agent_model_loaded 0.0" in seen["body"]
    assert {"starlette", "uvicorn", "prometheus_client"} <= set(seen["after_http"])
    assert not {"cryptography", "pydantic", "numpy"} & set(seen["after_http"])


def test_the_execution_providers_are_asked_once_per_installed_onnxruntime(tmp_path: Path) -> None:
    import onnxruntime

    cache = tmp_path / PROVIDERS_CACHE
    assert onnxruntime_providers(cache) == onnxruntime.get_available_providers()
    kept = json.loads(cache.read_text())
    assert kept["providers"] == onnxruntime.get_available_providers() and "onnxruntime" in kept["key"]
    # the kept answer is used while the key holds (a made-up list proves nothing asked again) ...
    cache.write_text(json.dumps({"key": kept["key"], "providers": ["MadeUpExecutionProvider"]}))
    assert onnxruntime_providers(cache) == ["MadeUpExecutionProvider"]
    # ... and asked again for another onnxruntime, or a file that is not a kept answer
    for stale in (json.dumps({"key": "elsewhere:1", "providers": ["MadeUp"]}), "not json", "[1, 2]"):
        cache.write_text(stale)
        assert onnxruntime_providers(cache) == onnxruntime.get_available_providers()
    assert collect_inventory(tmp_path).providers == onnxruntime.get_available_providers()


def test_the_malloc_arenas_are_limited_where_the_c_library_can() -> None:
    """In a child process: the limit holds for the rest of the process (0 asks for nothing)."""
    code = "from slmops_agent.runtime.memory import limit_arenas\nprint(limit_arenas(0), limit_arenas(2))\n"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert out == ["False", str(sys.platform == "linux")]

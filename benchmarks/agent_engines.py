"""The engines agent_bench.py measures and the processes they run in: the prompt, one generation's
timings (`Run`), the in-process engines (onnxruntime-genai, llama.cpp, transformers) behind a line
protocol on stdin (`worker`), the agent's serving stack as a server process (`serve`) and gRPC's floor
(`serve_floor`), the client calls over gRPC and the OpenAI-compatible API, and `Process`, which starts
`agent_bench.py` in one of those roles (fairness_bench.py uses it too)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

AGENT_BENCH = Path(__file__).with_name("agent_bench.py")  # the script a `Process` runs


STORY_SCHEMA = '{"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}'


SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


QUESTION = "Write a long story about a robot who learns to paint, with many details."


PROMPT = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"


RESULT = "RESULT "


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
            print(RESULT + json.dumps(one_run(once())), flush=True)
        elif command == "rss":
            print(f"RSS {peak_rss_mb()}", flush=True)
        else:
            return


def one_run(run: Run) -> dict[str, Any]:
    one = {
        "ttft_ms": run.ttft_ms,
        "decode_tps": run.decode_tps,
        "tokens": run.tokens,
        "prompt_tokens": run.prompt_tokens,
    }
    if run.server is not None:
        one["server_ttft_ms"], one["server_decode_tps"] = run.server
    return one


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
        cmd = [sys.executable, str(AGENT_BENCH), *role, *process_args(args)]
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


def process_args(args: argparse.Namespace) -> list[str]:
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

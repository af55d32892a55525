"""Fair sharing between clients on SmolLM2 (run by hand, never in CI): one client holds 8 long
streams, another sends short requests; its time to first token beside the 8 against on an idle agent.

The agent's serving stack (ModelHost + gRPC) runs in a subprocess (`agent_bench.py --serve`), as in
agent_bench. The probe sends `--probes` short requests one after the other (greedy, `--probe-tokens`
new tokens) on the idle agent, then again while the bulk client's 8 streams of `--bulk-tokens` run,
as client `probe` (`x-slmops-client`). `--same-client` sends the probes as the bulk client instead:
the queue then serves them in order behind its streams (what one FIFO did to every client).

    python benchmarks/fairness_bench.py --threads 2 --json fairness.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import agent_bench  # this folder's modules
import agent_engines

from slmops_agent.runtime.queue import CLIENT_HEADER as HEADER


def first_token_ms(stub: Any, client: str, tokens: int) -> float:
    from slmops_protos.agent.v1 import agent_pb2

    request = agent_pb2.GenerateRequest(prompt=agent_engines.PROMPT, max_new_tokens=tokens, temperature=0.0)
    t0 = time.perf_counter()
    call = stub.Generate(request, metadata=((HEADER, client),), timeout=600)
    for chunk in call:
        if chunk.text:
            took = (time.perf_counter() - t0) * 1000
            call.cancel()
            return took
    raise RuntimeError("the probe got no text")


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="The int4 onnxruntime-genai folder.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--streams", type=int, default=8, help="The bulk client's concurrent streams.")
    parser.add_argument("--bulk-tokens", type=int, default=512)
    parser.add_argument("--probe-tokens", type=int, default=4)
    parser.add_argument("--probes", type=int, default=12)
    parser.add_argument("--same-client", action="store_true", help="Probe as the bulk client (the FIFO baseline).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    args = parser.parse_args()
    model_dir = args.model_dir or agent_bench.default_model_dir()
    if model_dir is None:
        parser.error("no SmolLM2 cpu-int4 folder found; give --model-dir")
    import grpc

    from slmops_agent.client import channel_options
    from slmops_agent.runtime.spinning import resolve_spinning
    from slmops_protos.agent.v1 import agent_pb2, agent_pb2_grpc

    serve_args = argparse.Namespace(
        model_dir=model_dir, hf_dir=None, gguf=None, threads=args.threads, new_tokens=args.bulk_tokens,
        spinning="1" if resolve_spinning("auto", args.threads) else "0", runs=1, warmup=0,
    )  # fmt: skip
    agent = agent_engines.Process(serve_args, ["--serve", "grouped"])
    try:
        channel = grpc.insecure_channel(agent.ready[1], options=channel_options())
        stub = agent_pb2_grpc.InferenceStub(channel)
        first_token_ms(stub, "probe", args.probe_tokens)  # warm-up
        idle = [first_token_ms(stub, "probe", args.probe_tokens) for _ in range(args.probes)]
        bulk_tokens = [0] * args.streams
        stop = threading.Event()

        def bulk(i: int) -> None:
            request = agent_pb2.GenerateRequest(
                prompt=agent_engines.PROMPT, max_new_tokens=args.bulk_tokens, temperature=0.0
            )
            bulk_channel = grpc.insecure_channel(agent.ready[1], options=channel_options())
            call = agent_pb2_grpc.InferenceStub(bulk_channel).Generate(request, metadata=((HEADER, "bulk"),))
            try:
                for chunk in call:
                    bulk_tokens[i] += 1 if chunk.text else 0
                    if stop.is_set():
                        call.cancel()
                        break
            except grpc.RpcError:
                pass
            bulk_channel.close()

        threads = [threading.Thread(target=bulk, args=(i,), daemon=True) for i in range(args.streams)]
        for t in threads:
            t.start()
        while sum(1 for n in bulk_tokens if n) < min(args.streams, 4):  # the first batch streams
            time.sleep(0.05)
        probe_client = "bulk" if args.same_client else "probe"
        loaded = [first_token_ms(stub, probe_client, args.probe_tokens) for _ in range(args.probes)]
        still = sum(1 for n in bulk_tokens if n)
        stop.set()
        for t in threads:
            t.join(600)
    finally:
        agent.stop()
    figures = {
        "threads": args.threads,
        "streams": args.streams,
        "bulk_tokens": args.bulk_tokens,
        "probe_tokens": args.probe_tokens,
        "same_client": args.same_client,
        "idle_ttft_ms_p50": statistics.median(idle),
        "idle_ttft_ms_p95": p95(idle),
        "loaded_ttft_ms_p50": statistics.median(loaded),
        "loaded_ttft_ms_p95": p95(loaded),
        "ratio_p95": p95(loaded) / p95(idle),
        "bulk_streams_seen": still,
        "idle_ttft_ms_runs": [round(x, 2) for x in idle],
        "loaded_ttft_ms_runs": [round(x, 2) for x in loaded],
    }
    print(json.dumps(figures, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

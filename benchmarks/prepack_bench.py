"""onnxruntime's prepacking of int4 weights: memory against decode speed, one table from one run.

onnxruntime repacks MatMulNBits' int4 weights into its kernels' layout when a session loads
(`session.disable_prepacking` off, the default): the model's memory grows well past its file's size.
This loads the SmolLM2-135M cpu-int4 conversion with onnxruntime-genai, prepacking on and off, each
load in a process of its own, the two alternated `--rounds` times, and reports per setting the median
of: VmRSS after the load (and its anonymous and file-backed parts), the load's time, and greedy
decode tokens/s (`--new-tokens` after the prompt, the prefill's first token left out).

    python benchmarks/prepack_bench.py --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPT = "<|im_start|>user\nWrite a long story about a robot who learns to paint.<|im_end|>\n<|im_start|>assistant\n"
MIB = 1024 * 1024


def status_mb() -> dict[str, float]:
    fields = ("VmRSS", "RssAnon", "RssFile")
    return {
        line.split(":")[0]: int(line.split()[1]) / 1024
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith(fields)
    }


def one(model_dir: str, prepack: bool, threads: int, new_tokens: int) -> dict[str, Any]:
    """In the child: one load and one greedy decode."""
    import ctypes

    import onnxruntime_genai as og

    cfg = og.Config(model_dir)
    session: dict[str, Any] = {
        "intra_op_num_threads": threads,
        "session.intra_op.allow_spinning": "0",
        "enable_cpu_mem_arena": False,
        "session.disable_prepacking": "0" if prepack else "1",
    }
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    before = status_mb()["VmRSS"]
    t0 = time.perf_counter()
    model = og.Model(cfg)
    load_s = time.perf_counter() - t0
    tokenizer = og.Tokenizer(model)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # as the agent does after a load
    loaded = status_mb()
    ids = tokenizer.encode(PROMPT)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens + 1, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    generator.generate_next_token()  # the prefill's token
    t1 = time.perf_counter()
    n = 0
    while not generator.is_done() and n < new_tokens:
        generator.generate_next_token()
        n += 1
    return {
        "model_mb": loaded["VmRSS"] - before,
        "anon_mb": loaded["RssAnon"],
        "file_mb": loaded["RssFile"],
        "load_s": load_s,
        "decode_tps": n / (time.perf_counter() - t1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="an onnxruntime-genai folder (default: the SmolLM2 cpu-int4)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "PREPACK"), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.child[0], args.child[1] == "1", args.threads, args.new_tokens)))
        return
    model_dir = args.model_dir
    if model_dir is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from agent_bench import default_model_dir

        model_dir = default_model_dir()
        if model_dir is None:
            raise SystemExit("no SmolLM2 cpu-int4 conversion in the caches: run `pytest -m smollm2` once")
    weights = sum(p.stat().st_size for p in model_dir.iterdir() if p.name.startswith("model.onnx")) / MIB
    runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for _ in range(args.rounds):
        for prepack in (True, False):
            cmd = [sys.executable, __file__, "--child", str(model_dir), "1" if prepack else "0"]
            cmd += ["--threads", str(args.threads), "--new-tokens", str(args.new_tokens)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            runs[prepack].append(json.loads(done.stdout.strip().splitlines()[-1]))
    table = {
        ("on" if prepack else "off"): {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        for prepack, rs in runs.items()
    }
    print(f"model weights (model.onnx*): {weights:.1f} MiB; {args.threads} threads; median of {args.rounds}")
    print(f"{'prepacking':<11}{'RSS of the load':>16}{'anon':>8}{'file':>8}{'load s':>8}{'decode tok/s':>14}")
    for name, m in table.items():
        print(
            f"{name:<11}{m['model_mb']:>12.1f} MiB{m['anon_mb']:>8.1f}{m['file_mb']:>8.1f}"
            f"{m['load_s']:>8.2f}{m['decode_tps']:>14.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"weights_mb": weights, "median": table, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()

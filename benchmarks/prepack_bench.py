"""A loaded int4 model's memory against its decode speed: onnxruntime's weight prepacking and the
settings around it, one table from one run.

onnxruntime repacks MatMulNBits' int4 weights into its kernels' layout when a session loads
(`session.disable_prepacking` off, the default): the model's memory grows well past its file's size.
This loads the SmolLM2-135M cpu-int4 conversion with onnxruntime-genai under each variant below,
each load in a process of its own, the variants alternated `--rounds` times, and reports per variant
the median of: the VmRSS importing onnxruntime-genai adds (onnxruntime, numpy), the VmRSS the load
adds (and the process's anonymous and file-backed RSS then), the load's time, greedy decode
tokens/s (`--new-tokens` after the prompt, the prefill's first token left out), and the VmRSS over
the import's once a generator of `--max-length` has decoded (its KV cache included).

    python benchmarks/prepack_bench.py --threads 2 --rounds 3

Variants (session options in genai_config.json's decoder section, or the model's MatMulNBits
`accuracy_level` rewritten in a copy of the model, which the builder's profile sets):
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "<|im_start|>user\nWrite a long story about a robot who learns to paint.<|im_end|>\n<|im_start|>assistant\n"
MIB = 1024 * 1024

# name -> (session options, accuracy level to rewrite the model's MatMulNBits with, or None: as built)
VARIANTS: dict[str, tuple[dict[str, Any], int | None]] = {
    "prepacked (default)": ({}, None),
    "no prepacking": ({"session.disable_prepacking": "1"}, None),
    "fp32 compute (mlas.qnbit.force_fp32)": ({"mlas.qnbit.force_fp32": "1"}, None),
    "accuracy_level 1 (fp32 compute)": ({}, 1),
    "accuracy_level 0 (unset)": ({}, 0),
    "CPU arena on": ({"enable_cpu_mem_arena": True}, None),
    "LUT GEMM (mlas.use_lut_gemm)": ({"mlas.use_lut_gemm": "1"}, None),
}
__doc__ += "".join(
    f"    {name}: {opts or ''}{'' if level is None else f'accuracy_level={level}'}\n"
    for name, (opts, level) in VARIANTS.items()
)


def status_mb() -> dict[str, float]:
    fields = ("VmRSS", "RssAnon", "RssFile")
    return {
        line.split(":")[0]: int(line.split()[1]) / 1024
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith(fields)
    }


def one(model_dir: str, variant: str, threads: int, new_tokens: int, max_length: int) -> dict[str, Any]:
    """In the child: one load and one greedy decode."""
    import ctypes

    start = status_mb()["VmRSS"]
    import onnxruntime_genai as og

    cfg = og.Config(model_dir)
    session: dict[str, Any] = {
        "intra_op_num_threads": threads,
        "session.intra_op.allow_spinning": "0",
        "enable_cpu_mem_arena": False,
        **VARIANTS[variant][0],
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
    params.set_search_options(max_length=max_length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    generator.generate_next_token()  # the prefill's token
    t1 = time.perf_counter()
    n = 0
    while not generator.is_done() and n < new_tokens:
        generator.generate_next_token()
        n += 1
    decode_s = time.perf_counter() - t1
    return {
        "import_mb": before - start,
        "model_mb": loaded["VmRSS"] - before,
        "anon_mb": loaded["RssAnon"],
        "file_mb": loaded["RssFile"],
        "load_s": load_s,
        "decode_tps": n / decode_s,
        "generating_mb": status_mb()["VmRSS"] - before,
    }


def with_accuracy_level(model_dir: Path, level: int, out: Path) -> Path:
    """A copy of `model_dir` whose MatMulNBits nodes have `accuracy_level` = level."""
    import onnx

    shutil.copytree(model_dir, out)
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = level
    onnx.save(model, str(out / "model.onnx"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="an onnxruntime-genai folder (default: the SmolLM2 cpu-int4)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=2048, help="the generator's max_length (its KV cache)")
    parser.add_argument("--variants", nargs="*", choices=sorted(VARIANTS), help="default: all")
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.child[0], args.child[1], args.threads, args.new_tokens, args.max_length)))
        return
    model_dir = args.model_dir
    if model_dir is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from agent_bench import default_model_dir

        model_dir = default_model_dir()
        if model_dir is None:
            raise SystemExit("no SmolLM2 cpu-int4 conversion in the caches: run `pytest -m smollm2` once")
    weights = sum(p.stat().st_size for p in model_dir.iterdir() if p.name.startswith("model.onnx")) / MIB
    variants = args.variants or list(VARIANTS)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="prepack-") as tmp:
        dirs = {
            v: model_dir
            if VARIANTS[v][1] is None
            else with_accuracy_level(model_dir, VARIANTS[v][1] or 0, Path(tmp) / v)
            for v in variants
        }
        for _ in range(args.rounds):
            for v in variants:
                cmd = [sys.executable, __file__, "--child", str(dirs[v]), v, "--threads", str(args.threads)]
                cmd += ["--new-tokens", str(args.new_tokens), "--max-length", str(args.max_length)]
                done = subprocess.run(cmd, check=True, capture_output=True, text=True)
                runs[v].append(json.loads(done.stdout.strip().splitlines()[-1]))
    table = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in runs.items()}
    print(
        f"model weights (model.onnx*): {weights:.1f} MiB; {args.threads} threads; max_length {args.max_length}; "
        f"median of {args.rounds}; RSS in MiB"
    )
    width = max(len(v) for v in variants)
    heads = ("import", "load RSS", "anon", "file", "load s", "tok/s", "decoding")
    print(f"{'variant':<{width}}" + "".join(f"{h:>10}" for h in heads))
    for v, m in table.items():
        keys = ("import_mb", "model_mb", "anon_mb", "file_mb", "load_s", "decode_tps", "generating_mb")
        print(f"{v:<{width}}" + "".join(f"{m[k]:>10.{2 if k == 'load_s' else 1}f}" for k in keys))
    if args.json:
        args.json.write_text(json.dumps({"weights_mb": weights, "median": table, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Constrained decoding on the device-command task: the test split the builder generates (`slmops
builder task`, 100 examples by default) answered by the same model twice, through the agent's own
runtime (`LoadedModel.generate`, greedy, the task's system prompt): free, and held to the task's
JSON schema (`slmops_builder.train.tasks.action_schema`, the agent's json_schema constraint). Run by
hand, never in CI. `agent_bench.py --task-model` scores the same way (this module is the one home of
the scoring).

The model: an onnxruntime-genai folder, or a signed package (its manifest is verified with
--trust-key and its files unpacked to a temporary folder), e.g. SmolLM2 fine-tuned on the task and
built with `slmops builder build --profile cpu-int4`; --adapter answers through a LoRA adapter
(.onnx_adapter) on an adapter-ready base instead, as the agent serves a resident adapter package.

Per mode: valid JSON rate (the answer parses as one JSON object), exact match and field accuracy
(`actions.score`), answer tokens, and decode tokens/s (after the first token, the mean over
answers of two tokens or more); then the constrained decode speed as a fraction of the free one.
The two modes take turns example by example, so a change in the machine's load falls on both.

    python benchmarks/structured_bench.py --threads 2 --json structured.json
    python benchmarks/structured_bench.py --model-dir task-package --trust-key builder.key.pub --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ADAPTER = "task"


@contextmanager
def model_folder(path: Path, trust_key: Path | None) -> Iterator[Path]:
    """`path` itself when it is an onnxruntime-genai folder; a package's verified files, unpacked."""
    if (path / "genai_config.json").is_file():
        yield path
        return
    if not (path / "manifest.json").is_file():
        raise SystemExit(f"{path} is neither an onnxruntime-genai folder (genai_config.json) nor a package")
    if trust_key is None:
        raise SystemExit(f"{path} is a package: pass --trust-key with the public key that signed it")
    from slmops_builder.keys import load_public_key
    from slmops_builder.packaging import unpack_package

    with tempfile.TemporaryDirectory(prefix="structured-bench-") as tmp:
        yield unpack_package(path, Path(tmp) / "model", [load_public_key(trust_key)])


def score_task(
    model_dir: Path,
    *,
    examples: int = 100,
    threads: int = 2,
    max_new_tokens: int = 48,
    trust_key: Path | None = None,
    adapter: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The task's test split answered free and held to its schema, example by example in turn."""
    from slmops_agent.runtime.constraints import Constraint, ConstraintKind
    from slmops_agent.runtime.model import ModelInfo, load_model
    from slmops_agent.runtime.requests import GenerationRequest, Limits
    from slmops_builder.train.actions import score
    from slmops_builder.train.tasks import action_schema, generate_splits

    test = generate_splits(0, 0, examples).test
    limits = Limits(default_max_new_tokens=max_new_tokens)
    constraint = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(action_schema()))
    modes: dict[str, Constraint | None] = {"free": None, "json_schema": constraint}
    texts: dict[str, list[str]] = {m: [] for m in modes}
    tokens: dict[str, list[int]] = {m: [] for m in modes}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    load_before = os.getloadavg()[0]
    with model_folder(model_dir, trust_key) as folder:
        files = ((ADAPTER, str(adapter.resolve())),) if adapter is not None else ()
        info = ModelInfo(name="smollm2", adapters=tuple(n for n, _ in files), adapter_files=files)
        model = load_model(folder, info, threads=threads, max_batch=1)
        for i, ex in enumerate(test):
            messages = tuple((m["role"], m["content"]) for m in ex.prompt_messages)
            for mode, held in modes.items():
                req = GenerationRequest(
                    messages=messages, temperature=0.0, constraint=held, adapter=ADAPTER if files else ""
                )
                result = model.generate(req, limits=limits)
                texts[mode].append(result.text)
                tokens[mode].append(result.completion_tokens)
                if result.completion_tokens > 1:
                    rates[mode].append(result.tokens_per_s)
            if progress and (i + 1) % 10 == 0:
                print(f"{i + 1}/{len(test)}", file=sys.stderr)

    references = [ex.output for ex in test]
    rows: dict[str, dict[str, Any]] = {}
    for mode in modes:
        s = score(texts[mode], references)
        rows[mode] = {
            "examples": s.n,
            "valid_json_rate": round(s.valid_json / s.n, 4),
            "exact_match": round(s.exact_match, 4),
            "field_accuracy": round(s.field_accuracy, 4),
            "answer_tokens_mean": round(statistics.fmean(tokens[mode]), 2),
            "decode_tps_mean": round(statistics.fmean(rates[mode]), 1) if rates[mode] else 0.0,
        }
    free_tps = rows["free"]["decode_tps_mean"]
    ratio = rows["json_schema"]["decode_tps_mean"] / free_tps if free_tps else 0.0
    return {
        "model_dir": str(model_dir),
        "adapter": str(adapter) if adapter is not None else None,
        "threads": threads,
        "max_new_tokens": max_new_tokens,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "rows": rows,
        "schema_decode_tps_fraction": round(ratio, 3),
        "samples": {m: texts[m][:3] for m in modes},
    }


def print_task_table(out: dict[str, Any]) -> None:
    print(f"{'decoding':<12} {'valid JSON':>10} {'exact':>6} {'fields':>7} {'tokens':>7} {'decode t/s':>11}")
    for mode, r in out["rows"].items():
        print(
            f"{mode:<12} {r['valid_json_rate']:>10.0%} {r['exact_match']:>6.0%} {r['field_accuracy']:>7.0%} "
            f"{r['answer_tokens_mean']:>7.1f} {r['decode_tps_mean']:>11.1f}"
        )
    print(f"json_schema decode tokens/s as a fraction of free: {out['schema_decode_tps_fraction']:.3f}")
    print(f"load average {out['load_average'][0]} before, {out['load_average'][1]} after")


def main() -> None:
    from agent_bench import default_model_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="An onnxruntime-genai folder or a signed package [default: the base SmolLM2 cpu-int4 build].",
    )
    parser.add_argument("--trust-key", type=Path, default=None, help="The public key a package is signed with.")
    parser.add_argument("--adapter", type=Path, default=None, help="A .onnx_adapter to answer with (on its base).")
    parser.add_argument("--examples", type=int, default=100, help="Test examples of the task.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--json", type=Path, default=None, help="Write the figures here.")
    args = parser.parse_args()
    model_dir = args.model_dir or default_model_dir()
    if model_dir is None:
        sys.exit("no SmolLM2 cpu-int4 folder found: pass --model-dir (or run the smollm2 tests once)")
    out = score_task(
        model_dir,
        examples=args.examples,
        threads=args.threads,
        max_new_tokens=args.max_new_tokens,
        trust_key=args.trust_key,
        adapter=args.adapter,
    )
    print_task_table(out)
    target = args.json if args.json is not None else Path(tempfile.gettempdir(), "structured_bench.json")
    target.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

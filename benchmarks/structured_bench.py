"""Constrained decoding on the device-command task: the test split the builder generates (`slmops
builder task`, 100 examples by default) answered by the same model twice, through the agent's own
runtime (`LoadedModel.generate`, greedy, the task's system prompt): free, and held to the task's
JSON schema (`slmops_builder.train.tasks.action_schema`, the agent's json_schema constraint). Run by
hand, never in CI.

Per mode: valid JSON rate (the answer parses as one JSON object), exact match and field accuracy
(`actions.score`), answer tokens, and decode tokens/s (after the first token, the mean over
answers of two tokens or more); then the constrained decode speed as a fraction of the free one.
The two modes take turns example by example, so a change in the machine's load falls on both.

    python benchmarks/structured_bench.py --threads 2 --json structured.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    from agent_bench import default_model_dir

    from slmops_agent.runtime.constraints import Constraint, ConstraintKind
    from slmops_agent.runtime.model import ModelInfo, load_model
    from slmops_agent.runtime.requests import GenerationRequest, Limits
    from slmops_builder.train.actions import score
    from slmops_builder.train.tasks import action_schema, generate_splits

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="An onnxruntime-genai folder (SmolLM2 cpu-int4).")
    parser.add_argument("--examples", type=int, default=100, help="Test examples of the task.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--json", type=Path, default=None, help="Write the figures here.")
    args = parser.parse_args()
    model_dir = args.model_dir or default_model_dir()
    if model_dir is None:
        sys.exit("no SmolLM2 cpu-int4 folder found: pass --model-dir (or run the smollm2 tests once)")

    examples = generate_splits(0, 0, args.examples).test
    model = load_model(model_dir, ModelInfo(name="smollm2"), threads=args.threads, max_batch=1)
    limits = Limits(default_max_new_tokens=args.max_new_tokens)
    constraint = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(action_schema()))
    modes: dict[str, Constraint | None] = {"free": None, "json_schema": constraint}
    texts: dict[str, list[str]] = {m: [] for m in modes}
    tokens: dict[str, list[int]] = {m: [] for m in modes}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for i, ex in enumerate(examples):
        messages = tuple((m["role"], m["content"]) for m in ex.prompt_messages)
        for mode, held in modes.items():
            req = GenerationRequest(messages=messages, temperature=0.0, constraint=held)
            result = model.generate(req, limits=limits)
            texts[mode].append(result.text)
            tokens[mode].append(result.completion_tokens)
            if result.completion_tokens > 1:
                rates[mode].append(result.tokens_per_s)
        if (i + 1) % 10 == 0:
            print(f"{i + 1}/{len(examples)}", file=sys.stderr)

    references = [ex.output for ex in examples]
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
    out = {
        "model_dir": str(model_dir),
        "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "rows": rows,
        "schema_decode_tps_fraction": round(ratio, 3),
        "samples": {m: texts[m][:3] for m in modes},
    }
    print(f"{'decoding':<12} {'valid JSON':>10} {'exact':>6} {'fields':>7} {'tokens':>7} {'decode t/s':>11}")
    for mode, r in rows.items():
        print(
            f"{mode:<12} {r['valid_json_rate']:>10.0%} {r['exact_match']:>6.0%} {r['field_accuracy']:>7.0%} "
            f"{r['answer_tokens_mean']:>7.1f} {r['decode_tps_mean']:>11.1f}"
        )
    print(f"json_schema decode tokens/s as a fraction of free: {ratio:.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    else:
        Path(tempfile.gettempdir(), "structured_bench.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Distillation on the device-command task: teacher vs distilled student (fp32 and int4) vs the
undistilled student, in one table. By hand, not in CI (about 50 minutes on 2 cores).

    python benchmarks/distill_bench.py --threads 2 --json distill.json
    python benchmarks/distill_bench.py --test 300 ...   # about 64 minutes; 100 examples are few for a 95% line
    python benchmarks/distill_bench.py --reuse-teacher ...   # another student, same teacher and answers

1. teacher: SmolLM2-135M-Instruct fine-tuned on the task (LoRA, merged; fp32);
2. stage 1: the teacher answers its training inputs and more from the same templates (--distill-inputs;
   batched, cached JSONL, invalid answers dropped; with --keep-answers exact, wrong ones too);
3. stage 2: a layer-pruned copy of the teacher (--keep-layers) with its vocabulary trimmed to the
   task's tokens plus the --vocab-top most frequent (0 for no trimming) learns them with KL(T) + CE,
   the last --qat-steps of them on the int4 weights of the cpu-int4 profile (quantization-aware);
4. the student is converted to int4 (--int4-profile) and run in onnxruntime-genai;
5. all are scored on the held-out split (templates never seen in training), greedy, batch 1.
Decode time per response is the mean wall time of one greedy answer (transformers fp32 for the fp32
rows, onnxruntime-genai for student-int4); weights memory is the bytes of the parameters (fp32 rows)
or of the ONNX weight files (int4). Ratios are against the teacher.
With --json PATH: {"rows": [{"model", "exact_match", "decode_s_per_response", "weights_mb"}], ...}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _smollm2_hf() -> Path:
    for source in sorted((ROOT / ".cache" / "smollm2-hf").glob("*/slmops_source.json")):
        return source.parent
    sys.exit("no SmolLM2 HF folder in .cache/smollm2-hf: run `pytest -m smollm2` or `slmops builder import` first")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="HF folder [default: the cached SmolLM2]")
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "distill-bench")
    parser.add_argument("--train", type=int, default=600, help="the teacher's training examples")
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--teacher-steps", type=int, default=150)
    parser.add_argument("--student-steps", type=int, default=1000)
    parser.add_argument("--keep-layers", type=int, default=10)
    parser.add_argument("--vocab-top", type=int, default=4096, help="0: the student keeps the teacher's vocabulary")
    parser.add_argument(
        "--distill-inputs",
        type=int,
        default=1200,
        help="task inputs the teacher answers for the student (the training templates; at least --train)",
    )
    parser.add_argument("--context-length", type=int, default=2048, help="the student's context window")
    parser.add_argument(
        "--keep-answers",
        choices=("valid", "exact"),
        default="exact",
        help="the teacher's answers the student learns: every valid one, or only those equal to the reference",
    )
    parser.add_argument(
        "--qat-steps",
        type=int,
        default=400,
        help="the last N KD steps train on the cpu-int4 profile's int4 weights (quantization-aware; 0: none)",
    )
    parser.add_argument(
        "--int4-profile",
        default=None,
        help="the profile of the student-int4 row [default: cpu-int4 with --qat-steps, the grid it trained on; "
        "else cpu-int4-kquant-tied]",
    )
    parser.add_argument("--student-lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--reuse-teacher",
        action="store_true",
        help="keep the teacher and its answers from an earlier run with the same teacher settings and data",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.int4_profile is None:
        args.int4_profile = "cpu-int4" if args.qat_steps else "cpu-int4-kquant-tied"

    from slmops_builder.convert import convert
    from slmops_builder.profiles import get_profile
    from slmops_builder.train.distill import DistillConfig, distill, evaluate_models, teacher_outputs, weights_bytes
    from slmops_builder.train.finetune import finetune
    from slmops_builder.train.generation import OrtGenerator, evaluate_examples
    from slmops_builder.train.runs import FinetuneConfig, LoraSettings
    from slmops_builder.train.tasks import generate_splits

    model = args.model or _smollm2_hf()
    work: Path = args.work
    splits = generate_splits(args.train, 16, args.test, seed=0)
    timings: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        value = fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"[{timings[name]:7.1f} s] {name}", flush=True)
        return value

    teacher_cfg = FinetuneConfig(
        lora=LoraSettings(r=16, alpha=32, dropout=0.05),
        max_steps=args.teacher_steps,
        learning_rate=1e-3,
        batch_size=4,
        eval_every=max(args.teacher_steps // 4, 1),
        patience=0,
        save_every=args.teacher_steps,
        threads=args.threads,
        warmup_steps=min(5, args.teacher_steps // 10),
    )
    key = json.dumps({"model": str(model), "teacher": teacher_cfg.model_dump(mode="json"), "train": args.train})
    key_file = work / "teacher-key.json"
    reuse = args.reuse_teacher and key_file.is_file() and key_file.read_text() == key
    for stale in (work / "distill", *(() if reuse else (work,))):
        shutil.rmtree(stale, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    if reuse:
        teacher = Path(json.loads((work / "teacher-dir.json").read_text()))
        print(f"[reused] teacher {teacher}")
    else:
        run = timed(
            "teacher: LoRA fine-tune (merged)",
            lambda: finetune(
                model, splits.train, work / "teacher-run", teacher_cfg, validation=splits.validation, merge=True
            ),
        )
        teacher = run.merged_dir
        (work / "teacher-dir.json").write_text(json.dumps(str(teacher)))
        key_file.write_text(key)
    inputs = generate_splits(max(args.distill_inputs, args.train), 0, 0, seed=0).train
    assert inputs[: len(splits.train)] == splits.train  # the teacher's training inputs, then more of the same templates
    stage1 = timed(
        "stage 1: teacher answers",
        lambda: teacher_outputs(
            teacher, inputs, work / "teacher.jsonl", batch_size=8, threads=args.threads, keep=args.keep_answers
        ),
    )
    print(
        f"          teacher answers: {stage1.total - stage1.invalid} valid, {stage1.invalid} invalid, "
        f"{stage1.rejected} not the reference; {len(stage1.examples)} kept of {stage1.total}"
    )
    cfg = DistillConfig(
        keep_layers=args.keep_layers,
        max_steps=args.student_steps,
        qat_steps=args.qat_steps,
        learning_rate=args.student_lr,
        batch_size=8,
        threads=args.threads,
        vocab_top=args.vocab_top or None,
        context_length=args.context_length,
    )
    result = timed("stage 2: KD training", lambda: distill(teacher, stage1.examples, work / "distill", cfg))
    table = timed(
        "evaluate fp32 models",
        lambda: evaluate_models(
            {"teacher": teacher, "student": result.student_dir, "baseline": result.init_dir},
            splits.test,
            threads=args.threads,
        ),
    )
    converted = timed(
        f"student to {args.int4_profile}",
        lambda: convert(
            result.student_dir,
            get_profile(args.int4_profile),
            cache_dir=ROOT / ".cache" / "builder",
            threads=args.threads,
        ),
    )

    def int4_row() -> dict[str, Any]:
        gen = OrtGenerator(converted.path, threads=args.threads)
        out = gen.generate([e.prompt_messages for e in splits.test], max_new_tokens=64)
        s = evaluate_examples(out.texts, splits.test)
        return {
            **s.to_json(),
            "decode_s_per_response": round(out.seconds_per_response, 4),
            "weights_mb": round(weights_bytes(converted.path) / 1e6, 2),
        }

    table["student-int4"] = timed("evaluate student-int4", int4_row)
    t = table["teacher"]
    rows = []
    print()
    print(
        f"{'model':13} {'exact':>7} {'field':>6} {'decode s':>9} {'weights MB':>11} {'acc kept':>9} "
        f"{'less time':>10} {'less mem':>9}"
    )
    for name in ("teacher", "student", "student-int4", "baseline"):
        r = table[name]
        kept = r["exact_match"] / t["exact_match"] if t["exact_match"] else 0.0
        less_t = 1 - r["decode_s_per_response"] / t["decode_s_per_response"]
        less_m = 1 - r["weights_mb"] / t["weights_mb"]
        rows.append(
            {
                "model": name,
                "exact_match": r["exact_match"],
                "decode_s_per_response": r["decode_s_per_response"],
                "weights_mb": r["weights_mb"],
                "field_accuracy": r["field_accuracy"],
                "accuracy_retention": round(kept, 4),
                "decode_time_reduction": round(less_t, 4),
                "weights_reduction": round(less_m, 4),
            }
        )
        print(
            f"{name:13} {r['exact']:>3}/{r['n']:<3} {r['field_accuracy']:6.3f} {r['decode_s_per_response']:9.3f} "
            f"{r['weights_mb']:11.1f} {100 * kept:8.1f}% {100 * less_t:9.1f}% {100 * less_m:8.1f}%"
        )
    print("targets (student-int4): accuracy kept >= 95%, decode time -85% or more, weights -95% or more")
    if args.json:
        summary = {
            "rows": rows,
            "teacher_outputs": stage1.to_json(),
            "distill": result.to_json(),
            "config": {
                "train": len(splits.train),
                "test": len(splits.test),
                "distill_inputs": len(inputs),
                "int4_profile": args.int4_profile,
                "teacher": teacher_cfg.model_dump(mode="json"),
                "student": cfg.model_dump(mode="json"),
            },
            "timings_s": timings,
        }
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""LoRA on the device's precision: base vs adapter exact match, adapter on the int4 base vs merged int4,
and what an adapter-only update costs against a full package. By hand, not in CI.

    python benchmarks/lora_bench.py --steps 60 --train 400 --test 40 --threads 2 --json lora.json

Steps (SmolLM2-135M-Instruct from .cache/smollm2-hf, the device-command task from
slmops_builder.train.tasks, test split from templates the training never saw):
1. an adapter-ready int4 base (LoRA weights as graph inputs; LoRA MatMuls in float, accuracy level 1);
2. its dequantized HF copy; a LoRA adapter trained on it (so it learns against the int4 weights),
   exported to .onnx_adapter and run on the int4 base in onnxruntime-genai (the multi-LoRA path);
3. an adapter trained on the fp32 weights, run on the same int4 base;
4. merged variants converted with the cpu-int4 profile: the fp32-trained adapter merged into the
   fp32 weights, and the int4-trained adapter merged into the dequantized weights.
Finished steps in --work (base, dequantized copy, training runs with the same config and data) are
reused; --fresh starts over. Exact match is greedy generation scored by slmops_builder.train.tasks.score.
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
ADAPTER_ROW = "int4 base + adapter trained on int4 weights"
MERGED_ROW = "fp32-trained adapter merged into fp32, then int4"


def _smollm2_hf() -> Path:
    for source in sorted((ROOT / ".cache" / "smollm2-hf").glob("*/slmops_source.json")):
        return source.parent
    sys.exit("no SmolLM2 HF folder in .cache/smollm2-hf: run `pytest -m smollm2` or `slmops builder import` first")


def _folder_bytes(folder: Path, suffixes: tuple[str, ...] = ()) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and (not suffixes or p.suffix in suffixes))


def _evaluate_ort(model_dir: Path, examples: list[Any], *, adapter: Path | None, threads: int) -> dict[str, Any]:
    from slmops_builder.train.generation import OrtGenerator, evaluate_examples

    gen = OrtGenerator(model_dir, adapters={"task": adapter} if adapter else None, threads=threads)
    out = gen.generate([e.prompt_messages for e in examples], adapter="task" if adapter else None, max_new_tokens=64)
    s = evaluate_examples(out.texts, examples)
    return {**s.to_json(), "seconds_per_response": round(out.seconds_per_response, 3), "sample": out.texts[:2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="HF folder [default: the cached SmolLM2]")
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "lora-bench", help="working folder")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=40)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fresh", action="store_true", help="start over (default: reuse finished steps in --work)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()

    from slmops_builder.convert import convert
    from slmops_builder.profiles import get_profile
    from slmops_builder.train.adapters import AdapterBase, build_adapter_base, dequantize_base, export_adapter
    from slmops_builder.train.examples import dataset_sha256
    from slmops_builder.train.finetune import finetune
    from slmops_builder.train.run_output import merge_adapter
    from slmops_builder.train.runs import FinetuneConfig, LoraSettings
    from slmops_builder.train.tasks import generate_splits

    model = args.model or _smollm2_hf()
    work: Path = args.work
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    cache = ROOT / ".cache" / "builder"
    splits = generate_splits(args.train, 16, args.test, seed=0)
    lora = LoraSettings(r=args.r, alpha=2 * args.r, dropout=0.05)
    cfg = FinetuneConfig(
        lora=lora,
        max_steps=args.steps,
        learning_rate=args.lr,
        batch_size=args.batch,
        eval_every=max(args.steps // 4, 1),
        patience=0,
        save_every=args.steps,
        threads=args.threads,
        warmup_steps=min(5, args.steps // 10),
    )
    timings: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        value = fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"[{timings[name]:7.1f} s] {name}", flush=True)
        return value

    def train(name: str, base_model: Path) -> dict[str, Any]:
        """A LoRA run in work/<name>, reused when it finished with the same config and data."""
        out = work / name
        summary = out / "finetune.json"
        if summary.is_file():
            done = json.loads(summary.read_text())
            same = done["config"] == cfg.model_dump(mode="json") and done["train_sha256"] == dataset_sha256(
                splits.train
            )
            if same and done["base_model"] == str(base_model.resolve()):
                print(f"[  reused ] {name}", flush=True)
                return dict(done)
        shutil.rmtree(out, ignore_errors=True)
        timed(f"train {name}", lambda: finetune(base_model, splits.train, out, cfg, validation=splits.validation))
        return dict(json.loads(summary.read_text()))

    base_dir = work / "base-int4"
    if (base_dir / "genai_config.json").is_file():
        base = AdapterBase.load(base_dir)
    else:
        base = timed("build int4 adapter-ready base", lambda: build_adapter_base(model, lora, base_dir,
                     precision="int4", cache_dir=cache, threads=args.threads))  # fmt: skip
    deq = work / "dequantized"
    if not (deq / "config.json").is_file():
        timed("dequantize the int4 base", lambda: dequantize_base(model, base.path, deq))
    runs = {"int4": train("lora-int4", deq), "fp32": train("lora-fp32", model)}
    adapters = {k: work / f"task-{k}.onnx_adapter" for k in runs}
    for k, run in runs.items():
        export_adapter(Path(run["adapter_dir"]), base, adapters[k])

    def merged_int4(run: dict[str, Any], into: Path, name: str) -> Path:
        merged = merge_adapter(into, Path(run["adapter_dir"]), work / name)
        converted = timed(f"convert {name} to cpu-int4", lambda: convert(merged, get_profile("cpu-int4"),
                          cache_dir=cache, threads=args.threads))  # fmt: skip
        return Path(converted.path)

    def ev(model_dir: Path, adapter: Path | None = None) -> dict[str, Any]:
        return _evaluate_ort(model_dir, splits.test, adapter=adapter, threads=args.threads)

    rows: dict[str, dict[str, Any]] = {}
    rows["int4 base, no adapter"] = timed("eval base", lambda: ev(base.path))
    rows[ADAPTER_ROW] = timed("eval base + int4-trained adapter", lambda: ev(base.path, adapters["int4"]))
    rows["int4 base + adapter trained on fp32 weights"] = timed(
        "eval base + fp32-trained adapter", lambda: ev(base.path, adapters["fp32"])
    )
    m32 = merged_int4(runs["fp32"], model, "merged-fp32")
    rows[MERGED_ROW] = timed("eval merged fp32 -> int4", lambda: ev(m32))
    m4 = merged_int4(runs["int4"], deq, "merged-dequantized")
    rows["int4-trained adapter merged into dequantized weights, then int4"] = timed(
        "eval merged dequantized -> int4", lambda: ev(m4)
    )
    full_bytes = _folder_bytes(base.path)
    adapter_bytes = adapters["int4"].stat().st_size
    adapter_em = rows[ADAPTER_ROW]["exact_match"]
    merged_em = rows[MERGED_ROW]["exact_match"]
    result = {
        "model": str(model),
        "config": {**cfg.model_dump(mode="json"), "train": len(splits.train), "test": len(splits.test)},
        "rows": rows,
        "adapter_bytes": adapter_bytes,
        "full_package_bytes": full_bytes,
        "adapter_fraction": round(adapter_bytes / full_bytes, 4),
        "adapter_vs_merged_accuracy": round(adapter_em / merged_em, 4) if merged_em else None,
        "train_loss": {k: [r["first_train_loss"], r["last_train_loss"]] for k, r in runs.items()},
        "best_val_loss": {k: r["best_val_loss"] for k, r in runs.items()},
        "timings_s": timings,
    }
    print()
    print(f"{'variant':66} {'exact':>7} {'field':>7} {'valid':>6} {'s/resp':>7}")
    for name, row in rows.items():
        print(
            f"{name:66} {row['exact']:>3}/{row['n']:<3} {row['field_accuracy']:7.3f} {row['valid_json']:>6}"
            f" {row['seconds_per_response']:7.3f}"
        )
    print(
        f"\nadapter {adapter_bytes / 2**20:.2f} MiB vs full int4 model {full_bytes / 2**20:.1f} MiB: "
        f"{100 * result['adapter_fraction']:.2f}% of the bytes; adapter accuracy / merged accuracy: "
        f"{result['adapter_vs_merged_accuracy']}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Training steps per second of the builder's engines: LoRA fine-tuning (and distillation when
`slmops_builder.train.distill.distill` is there), in whichever slmops_builder the interpreters import.

    python benchmarks/train_bench.py --python /work/main/.venv/bin/python --python .venv/bin/python

runs every (interpreter, engine) in a subprocess of its own, in rounds that take turns (so a change
in the machine's load falls on all alike), and prints one table: steps per second of wall time and
per CPU second of the training process (the figure a loaded machine disturbs least), per run and
their median, and each interpreter's medians against the first one's. Both are measured between the
first and the last progress event (the first step, which warms up, and the loading and writing around the run are
left out). The model: `--model DIR` (an HF folder, e.g. SmolLM2's), or a random Llama built here from
the test suite's tiny tokenizer: `tiny` (2 layers, hidden 64) or `small` (8 layers, hidden 512, ~30M).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _model(size: str, root: Path) -> Path:
    """A random Llama of `size` with the tiny model's tokenizer (seeded: the same in every process)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from slmops_testing.tiny_model import make_tiny_hf_model

    tiny = make_tiny_hf_model(root / "tiny")
    if size == "tiny":
        return tiny
    cfg = LlamaConfig.from_pretrained(str(tiny))
    cfg.update({"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8})
    cfg.update({"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64})
    torch.manual_seed(0)
    out = root / size
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tiny)).save_pretrained(str(out))
    return out


def _rates(events: list[tuple[Any, float]]) -> dict[str, float]:
    """Steps per second of wall time and per CPU second of this process, first to last event."""
    (first, cpu0), (last, cpu1) = events[0], events[-1]
    steps = last.step - first.step
    return {"steps_per_s": steps / max(last.seconds - first.seconds, 1e-9), "steps_per_cpu_s": steps / (cpu1 - cpu0)}


def _one(engine: str, model: Path, steps: int, batch: int, threads: int, root: Path) -> dict[str, Any]:
    """One run of `engine` in this process: {"steps_per_s", "source"}."""
    import slmops_builder
    from slmops_builder.train.tasks import generate_splits

    events: list[tuple[Any, float]] = []

    def progress(event: Any) -> None:
        if not events or event.step != events[-1][0].step:  # one event per step
            events.append((event, time.process_time()))

    data = generate_splits(64, 0, 0, seed=0).train
    if engine == "finetune":
        from slmops_builder.train.finetune import finetune
        from slmops_builder.train.runs import FinetuneConfig, LoraSettings

        cfg = FinetuneConfig(
            lora=LoraSettings(r=8, alpha=16, dropout=0.0),
            max_steps=steps,
            batch_size=batch,
            save_every=steps,
            threads=threads,
        )
        finetune(model, data, root / "finetune", cfg, progress=progress)
    else:
        from slmops_builder.train.distill import DistillConfig, distill

        layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
        dcfg = DistillConfig(keep_layers=max(layers // 2, 1), max_steps=steps, batch_size=batch, threads=threads)
        distill(model, data, root / "distill", dcfg, progress=progress)
    return {**_rates(events), "source": str(Path(slmops_builder.__file__).parent)}


def _engines(python: str) -> list[str]:
    has_distill = subprocess.run(
        [python, "-c", "from slmops_builder.train.distill import distill"], capture_output=True
    ).returncode
    return ["finetune"] + (["distill"] if has_distill == 0 else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", action="append", help="interpreter to run (repeat; default: this one)")
    ap.add_argument("--model", type=Path, help="HF model folder [default: a random Llama of --size]")
    ap.add_argument("--size", choices=("tiny", "small"), default="small")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engine", choices=("finetune", "distill"), help="(internal) one run in this process")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.engine:  # a child: one run, its figures as JSON on the last line
            model = args.model or _model(args.size, root)
            row = _one(args.engine, model, args.steps, args.batch_size, args.threads, root)
            print(json.dumps(row))
            return
        pythons = args.python or [sys.executable]
        model = args.model or _model(args.size, root / "model")
        engines = {py: _engines(py) for py in pythons}
        runs: dict[tuple[str, str], list[dict[str, float]]] = {}
        sources: dict[str, str] = {}
        for _ in range(args.rounds):
            for py in pythons:
                for engine in engines[py]:
                    cmd = [py, __file__, "--engine", engine, "--model", str(model), "--steps", str(args.steps)]
                    cmd += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
                    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    if done.returncode != 0:
                        sys.exit(f"{py} {engine} failed:\n{done.stderr[-2000:]}")
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                    runs.setdefault((py, engine), []).append(row)
                    sources[py] = row["source"]
    name = str(args.model) if args.model else f"random Llama ({args.size})"
    print(f"model: {name}; {args.steps} steps, batch {args.batch_size}, {args.threads} thread(s), {args.rounds} rounds")
    head = "| interpreter (slmops_builder) | engine | steps/s per run | median | per CPU s: per run | median |"
    print(f"{head} vs {pythons[0]} |")
    print("|---|---|---|---|---|---|---|")
    for (py, engine), rows in runs.items():
        wall, cpu = _medians(rows)
        base = runs.get((pythons[0], engine))
        ratio = "-"
        if base:
            base_wall, base_cpu = _medians(base)
            ratio = f"{wall / base_wall:.3f} (CPU {cpu / base_cpu:.3f})"
        walls = ", ".join(f"{r['steps_per_s']:.3f}" for r in rows)
        cpus = ", ".join(f"{r['steps_per_cpu_s']:.3f}" for r in rows)
        print(f"| {py} ({sources[py]}) | {engine} | {walls} | {wall:.3f} | {cpus} | {cpu:.3f} | {ratio} |")


def _medians(rows: list[dict[str, float]]) -> tuple[float, float]:
    return statistics.median(r["steps_per_s"] for r in rows), statistics.median(r["steps_per_cpu_s"] for r in rows)


if __name__ == "__main__":
    main()

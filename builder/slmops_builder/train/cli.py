"""`slmops builder task | finetune | distill | adapter-base | adapter-export`: training commands.

`register(app)` adds them to the builder's typer app. Every heavy import happens inside a command,
so `slmops --help` stays fast. User errors print one line and exit 1, never a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from slmops_builder.cli_errors import err_console, fail, user_errors
from slmops_builder.train.cli_task import (
    CacheDirOpt,
    KeyOpt,
    MaxCharsOpt,
    PackageProfileOpt,
    PackageVersionOpt,
    PatternOpt,
    ScorerOpt,
    SystemOpt,
    ValidOpt,
    check_package_options,
    retention,
    retention_table,
    task_spec,
)

__all__ = ["register"]

_out = Console(soft_wrap=True)
_err = err_console

DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda.")]
PrecisionOpt = Annotated[
    str, typer.Option("--precision", help="auto (bf16 on a GPU that has it, else fp32), fp32, bf16 or fp16.")
]
GradientCheckpointingOpt = Annotated[bool, typer.Option("--gradient-checkpointing", help="Trade compute for memory.")]


def _check_device_options(device: str, precision: str) -> None:
    """--device and --precision among the values the training engines know (`trainer_setup`)."""
    from slmops_builder.train.trainer_setup import DEVICES, PRECISIONS

    if device not in DEVICES:
        fail(f"--device must be {', '.join(DEVICES)}, not {device!r}")
    if precision not in PRECISIONS:
        fail(f"--precision must be {', '.join(PRECISIONS)}, not {precision!r}")


@contextmanager
def _step_progress(total: int, label: str, quiet: bool) -> Iterator[Callable[[Any], None]]:
    """A rich progress bar fed with ProgressEvents (nothing with --json)."""
    if quiet:
        yield lambda event: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(),
        console=_err,
    ) as progress:
        task = progress.add_task(label, total=total, loss="")

        def update(event: Any) -> None:
            text = f"loss {event.train_loss:.4f}"
            if event.val_loss is not None:
                text += f"  val {event.val_loss:.4f}"
            progress.update(task, completed=event.step, loss=text)

        yield update


def _read_template(path: Path | None) -> str | None:
    if path is None:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"no chat template file at {path}")
    return path.read_text()


def task(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for train.jsonl, validation.jsonl, test.jsonl.")],
    train: Annotated[int, typer.Option("--train", help="Training examples.")] = 2000,
    validation: Annotated[int, typer.Option("--validation", help="Validation examples.")] = 200,
    test: Annotated[int, typer.Option("--test", help="Test examples.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Seed (same seed, same files).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Generate the device-command task (command -> JSON action), splits from disjoint templates."""
    with user_errors():
        from slmops_builder.train.examples import dataset_sha256, write_jsonl
        from slmops_builder.train.tasks import SPLITS, generate_splits

        splits = generate_splits(train, validation, test, seed=seed)
        summary: dict[str, Any] = {"out": str(out), "seed": seed, "splits": {}}
        for name in SPLITS:
            examples = splits.split(name)
            write_jsonl(examples, out / f"{name}.jsonl")
            summary["splits"][name] = {
                "examples": len(examples),
                "templates": len(splits.templates[name]),
                "sha256": dataset_sha256(examples),
            }
        if as_json:
            typer.echo(json.dumps(summary, indent=2))
            return
        table = Table(title=f"device-command task (seed {seed}) in {out}")
        for col in ("split", "examples", "templates", "sha256"):
            table.add_column(col)
        for name, row in summary["splits"].items():
            table.add_row(name, str(row["examples"]), str(row["templates"]), row["sha256"][:16])
        _out.print(table)


def finetune(
    ctx: typer.Context,
    model: Annotated[Path, typer.Option("--model", "-m", help="Base HF model folder.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Training JSONL ({input, output} or {messages}).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (adapter/, checkpoints/, loss.csv, loss.png).")],
    validation: Annotated[
        Path | None, typer.Option("--validation", help="Validation JSONL: early stopping and best adapter.")
    ] = None,
    r: Annotated[
        int, typer.Option("--r", "--lora-r", help="LoRA rank (--lora-r under torchrun, which takes --r as its own).")
    ] = 8,
    alpha: Annotated[int, typer.Option("--alpha", help="LoRA alpha.")] = 16,
    dropout: Annotated[float, typer.Option("--dropout", help="LoRA dropout.")] = 0.05,
    target_modules: Annotated[
        str, typer.Option("--target-modules", help="Comma-separated module names.")
    ] = "q_proj,k_proj,v_proj,o_proj",
    chat_template: Annotated[
        Path | None, typer.Option("--chat-template", help="Jinja chat template file [default: the model's].")
    ] = None,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Optimizer steps.")] = 50,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 2e-4,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Examples per micro-batch, across all processes (the global batch).")
    ] = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per step.")] = 1,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per example (truncated).")] = 256,
    warmup: Annotated[int, typer.Option("--warmup", help="Warm-up steps.")] = 0,
    gradient_checkpointing: GradientCheckpointingOpt = False,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Steps between validation losses.")] = 10,
    patience: Annotated[int, typer.Option("--patience", help="Evaluations without improvement; 0: off.")] = 3,
    save_every: Annotated[int, typer.Option("--save-every", help="Steps between checkpoints.")] = 10,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    threads: Annotated[int | None, typer.Option("--threads", help="Torch threads.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in --out.")] = False,
    merge: Annotated[bool, typer.Option("--merge", help="Also write base+adapter merged (out/merged).")] = False,
    qlora: Annotated[bool, typer.Option("--qlora", help="4-bit base (needs CUDA and bitsandbytes).")] = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help="peft: PEFT on transformers' Trainer (all options)."
            " olive: 'olive finetune --method lora --torch_dtype float32' (always float32: Olive's bfloat16"
            " default is slow and lossy on CPU; LoRA dropout fixed at 0.05; refuses --validation, --resume,"
            " --patience, --eval-every, --save-every, --qlora, --precision bf16/fp16; needs the"
            " datasets package).",
        ),
    ] = "peft",
    test: Annotated[
        Path | None, typer.Option("--test", help="Held-out JSONL: score the base and merged models (with --merge).")
    ] = None,
    system: SystemOpt = None,
    scorer: ScorerOpt = "json",
    valid: ValidOpt = None,
    pattern: PatternOpt = None,
    max_chars: MaxCharsOpt = 2000,
    package_profile: PackageProfileOpt = None,
    key: KeyOpt = None,
    package_name: Annotated[str, typer.Option("--package-name", help="Name of the package.")] = "finetuned",
    package_version: PackageVersionOpt = "1.0.0",
    cache_dir: CacheDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON (no progress bar).")] = False,
) -> None:
    """Fine-tune a LoRA adapter with PEFT on transformers' Trainer (CUDA when present, else CPU; QLoRA
    on CUDA; several processes under torchrun or accelerate launch), or with Olive (--engine olive).

    For adapters that run on an int4 base, train on the base's dequantized copy
    ('adapter-base --dequantized DIR', then '--model DIR').
    """
    with user_errors():
        from slmops_builder.train.examples import load_jsonl
        from slmops_builder.train.finetune import TRAINING_ENGINES
        from slmops_builder.train.finetune import finetune as run_finetune
        from slmops_builder.train.runs import FinetuneConfig, LoraSettings
        from slmops_builder.train.trainer_setup import is_main_process

        if engine not in TRAINING_ENGINES:
            fail(f"--engine must be {' or '.join(TRAINING_ENGINES)}, not {engine!r}")
        _check_device_options(device, precision)
        settings: dict[str, Any] = {
            "max_steps": max_steps,
            "learning_rate": lr,
            "batch_size": batch_size,
            "grad_accum": grad_accum,
            "max_length": max_length,
            "warmup_steps": warmup,
            "gradient_checkpointing": gradient_checkpointing,
            "eval_every": eval_every,
            "patience": patience,
            "save_every": save_every,
            "seed": seed,
            "threads": threads,
            "qlora": qlora,
            "device": device,
            "precision": precision,
        }
        # Left to the config's defaults (the same values) unless given on the command line: an engine
        # that cannot honour them (olive) refuses only what was asked for.
        for name in ("eval_every", "patience", "save_every"):
            source = ctx.get_parameter_source(name)  # typer's own (vendored) click: compare by name
            if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
                del settings[name]
        cfg = FinetuneConfig(
            engine=engine,  # type: ignore[arg-type]  # checked above
            lora=LoraSettings(
                r=r,
                alpha=alpha,
                dropout=dropout,
                target_modules=tuple(t.strip() for t in target_modules.split(",") if t.strip()),
            ),
            chat_template=_read_template(chat_template),
            **settings,
        )
        TRAINING_ENGINES[engine].check(cfg)
        spec = task_spec(system, scorer, valid, pattern, max_chars)
        if (test is not None or package_profile is not None) and not merge:
            fail("--test and --package-profile score the merged model: add --merge")
        check_package_options(package_profile, key, test, package_version)
        train_examples = load_jsonl(data, system=spec.system)
        val_examples = load_jsonl(validation, system=spec.system) if validation else []
        held_out = load_jsonl(test, system=spec.system) if test else []
        with _step_progress(max_steps, f"finetune ({engine})", as_json or not is_main_process()) as progress:
            result = run_finetune(
                model,
                train_examples,
                out,
                cfg,
                validation=val_examples,
                resume=resume,
                merge=merge,
                progress=progress,
            )
        if not is_main_process():
            return  # under torchrun / accelerate launch, the main process reports and writes
        summary = {**result.to_json(), "engine": engine}
        if held_out and result.merged_dir is not None:
            from slmops_builder.train.distill import evaluate_models

            models = {"base": model, "merged": result.merged_dir}
            with _err.status("evaluating ...") if not as_json else _nothing():
                summary["evaluation"] = evaluate_models(models, held_out, threads=threads, task=spec)
            if package_profile is not None and key is not None:
                summary["retention"] = retention(
                    result.merged_dir, package_profile, held_out, spec,
                    {n: row["score"] for n, row in summary["evaluation"].items()},
                    key=key, out=out / "package", name=package_name, version=package_version,
                    cache_dir=cache_dir, threads=threads, max_new_tokens=64, quiet=as_json,
                )  # fmt: skip
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if as_json:
            typer.echo(json.dumps(summary, indent=2))
            return
        if "retention" in summary:
            _out.print(retention_table(summary["retention"]))
        _out.print(
            f"adapter: {result.adapter_dir} ({result.adapter_bytes / 1024:.0f} KiB) after {result.steps} steps"
            + (" (stopped early)" if result.stopped_early else "")
            + f" [{engine}]"
        )
        first, last = summary["first_train_loss"], summary["last_train_loss"]
        if first is None:
            _out.print("no loss curve (the trainer reported no losses)")
            return
        _out.print(f"train loss {first:.4f} -> {last:.4f}; best validation loss {result.best_val_loss}")
        _out.print(f"curves: {result.loss_csv}, {result.loss_png}")


def distill(
    teacher: Annotated[Path, typer.Option("--teacher", "-t", help="Teacher HF folder (fine-tuned on the task).")],
    data: Annotated[Path, typer.Option("--data", "-d", help="JSONL task inputs (references only score the teacher).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (teacher.jsonl, student/, loss.csv).")],
    test: Annotated[Path | None, typer.Option("--test", help="Held-out JSONL: evaluate all three models.")] = None,
    student: Annotated[
        Path | None, typer.Option("--student", help="Student HF folder [default: a layer-pruned teacher].")
    ] = None,
    keep_layers: Annotated[int, typer.Option("--keep-layers", help="Layers of the pruned student.")] = 8,
    vocab_top: Annotated[
        int | None,
        typer.Option(
            "--vocab-top",
            help="Trim the pruned student's vocabulary to the task's tokens plus the N most frequent "
            "[default: keep the teacher's].",
        ),
    ] = None,
    context_length: Annotated[
        int | None,
        typer.Option("--context-length", help="The pruned student's context window [default: the teacher's]."),
    ] = None,
    max_steps: Annotated[int, typer.Option("--max-steps")] = 200,
    qat_steps: Annotated[
        int,
        typer.Option(
            "--qat-steps",
            help="Train the last N steps on the int4 weights of the cpu-int4 profile (RTN, block 32) and save "
            "the student on that grid: build it with -p cpu-int4 and it loses nothing more [default: 0, float].",
        ),
    ] = 0,
    lr: Annotated[float, typer.Option("--lr")] = 5e-4,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    temperature: Annotated[float, typer.Option("--temperature", help="KD softmax temperature.")] = 2.0,
    kd_weight: Annotated[float, typer.Option("--kd-weight", help="Weight of KL (1 - it: CE on teacher text).")] = 0.5,
    teacher_batch: Annotated[int, typer.Option("--teacher-batch", help="Teacher generation batch.")] = 8,
    keep_answers: Annotated[
        str,
        typer.Option(
            "--keep-answers",
            help="The teacher's answers the student learns: every valid one, or only those equal to their "
            "input's reference (the teacher's mistakes are not taught).",
        ),
    ] = "valid",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 64,
    eval_limit: Annotated[int, typer.Option("--eval-limit", help="Test examples to evaluate (0: all).")] = 0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    threads: Annotated[int | None, typer.Option("--threads")] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    gradient_checkpointing: GradientCheckpointingOpt = False,
    save_every: Annotated[int, typer.Option("--save-every", help="Steps between checkpoints (0: none).")] = 50,
    keep_checkpoints: Annotated[int, typer.Option("--keep-checkpoints", help="Checkpoints kept.")] = 1,
    resume: Annotated[
        bool, typer.Option("--resume", help="Go on from the last checkpoint in OUT/run/checkpoints.")
    ] = False,
    system: SystemOpt = None,
    scorer: ScorerOpt = "json",
    valid: ValidOpt = None,
    pattern: PatternOpt = None,
    max_chars: MaxCharsOpt = 2000,
    package_profile: PackageProfileOpt = None,
    key: KeyOpt = None,
    package_name: Annotated[str, typer.Option("--package-name", help="Name of the package.")] = "distilled",
    package_version: PackageVersionOpt = "1.0.0",
    cache_dir: CacheDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Distil a teacher into a smaller student: teacher answers (cached), then KD training; with --test,
    the three models scored; with --package-profile, the student's package built and scored too
    (retention; all in OUT/summary.json). Under torchrun or accelerate launch, the training runs in
    every process (--batch-size is the global batch) and the first one does the rest."""
    with user_errors():
        from slmops_builder.train.distill import DistillConfig, evaluate_models, teacher_outputs
        from slmops_builder.train.distill import distill as run_distill
        from slmops_builder.train.examples import load_jsonl
        from slmops_builder.train.trainer_setup import (
            is_main_process,
            main_process_first,
            per_process_batch,
            resolve_device,
            resolve_precision,
            world_size,
        )

        if keep_answers not in ("valid", "exact"):
            fail(f"--keep-answers must be valid or exact, not {keep_answers!r}")
        _check_device_options(device, precision)
        per_process_batch(batch_size, world_size())
        spec = task_spec(system, scorer, valid, pattern, max_chars)
        check_package_options(package_profile, key, test, package_version)
        inputs = load_jsonl(data, system=spec.system)
        held_out = load_jsonl(test, system=spec.system) if test else []
        cfg = DistillConfig(
            keep_layers=keep_layers,
            vocab_top=vocab_top,
            context_length=context_length,
            max_steps=max_steps,
            qat_steps=qat_steps,
            learning_rate=lr,
            batch_size=batch_size,
            temperature=temperature,
            kd_weight=kd_weight,
            seed=seed,
            threads=threads,
            teacher_batch_size=teacher_batch,
            max_new_tokens=max_new_tokens,
            device=device,  # type: ignore[arg-type]  # checked above
            precision=precision,  # type: ignore[arg-type]  # checked above
            gradient_checkpointing=gradient_checkpointing,
            save_every=save_every,
            keep_checkpoints=keep_checkpoints,
            resume=resume,
        )
        where = resolve_device(cfg.device)
        resolve_precision(cfg.precision, where)  # refused before the teacher runs
        main = is_main_process()
        quiet = as_json or not main
        status = _err.status("stage 1: teacher answers ...") if not quiet else _nothing()
        with main_process_first(where), status:  # the main process answers (or reads the cache), then the others
            stage1 = teacher_outputs(
                teacher,
                inputs,
                out / "teacher.jsonl",
                batch_size=teacher_batch,
                max_new_tokens=max_new_tokens,
                threads=threads,
                keep=keep_answers,  # type: ignore[arg-type]  # checked above
                task=spec,
            )
        if not quiet:
            _out.print(
                f"teacher: {stage1.total - stage1.invalid} valid, {stage1.invalid} invalid (filtered) of {stage1.total}"
                + (f"; {stage1.rejected} not the reference (filtered)" if keep_answers == "exact" else "")
                + (" (cached)" if stage1.cached else f" in {stage1.seconds:.0f} s")
            )
        with _step_progress(max_steps, "distill", quiet) as progress:
            result = run_distill(teacher, stage1.examples, out / "run", cfg, student=student, progress=progress)
        if not main:
            return
        summary: dict[str, Any] = {"teacher_outputs": stage1.to_json(), "distill": result.to_json()}
        if held_out:
            chosen = held_out[:eval_limit] if eval_limit else held_out
            models = {"teacher": teacher, "student": result.student_dir}
            models["baseline"] = result.init_dir if result.init_dir is not None else student  # type: ignore[assignment]
            with _err.status("evaluating ...") if not as_json else _nothing():
                summary["evaluation"] = evaluate_models(
                    models, chosen, max_new_tokens=max_new_tokens, threads=threads, task=spec
                )
            if package_profile is not None and key is not None:
                scores = {n: summary["evaluation"][n]["score"] for n in ("teacher", "student")}
                summary["retention"] = retention(
                    result.student_dir, package_profile, chosen, spec, scores, key=key, out=out / "package",
                    name=package_name, version=package_version, cache_dir=cache_dir, threads=threads,
                    max_new_tokens=max_new_tokens, quiet=as_json,
                )  # fmt: skip
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if as_json:
            typer.echo(json.dumps(summary, indent=2))
            return
        _out.print(f"student: {result.student_dir} ({result.mode}, {result.steps} steps)")
        if "evaluation" in summary:
            table = Table(title="held-out evaluation")
            for col in (f"model ({scorer})", "score", "exact match", "valid", "decode s/resp", "weights MB"):
                table.add_column(col)
            for name, row in summary["evaluation"].items():
                table.add_row(
                    name,
                    f"{row['score']:.3f}",
                    f"{row['exact_match']:.3f}",
                    f"{row['valid']}/{row['n']}",
                    f"{row['decode_s_per_response']:.3f}",
                    f"{row['weights_mb']:.1f}",
                )
            _out.print(table)
        if "retention" in summary:
            _out.print(retention_table(summary["retention"]))


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def adapter_base(
    model: Annotated[Path, typer.Option("--model", "-m", help="Base HF model folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapter-ready onnxruntime-genai folder to write.")],
    precision: Annotated[str, typer.Option("--precision", help="int4 or fp32.")] = "int4",
    r: Annotated[int, typer.Option("--r", help="LoRA rank (adapters may use another rank).")] = 8,
    target_modules: Annotated[str, typer.Option("--target-modules")] = "q_proj,k_proj,v_proj,o_proj",
    dequantized: Annotated[
        Path | None, typer.Option("--dequantized", help="Also write the int4 base's dequantized HF copy here.")
    ] = None,
    package: Annotated[Path | None, typer.Option("--package", help="Also write a signed model package here.")] = None,
    name: Annotated[str, typer.Option("--name")] = "model-lora-base",
    version: Annotated[str, typer.Option("--version")] = "1.0.0",
    key: Annotated[Path | None, typer.Option("--key", "-k", help="Signing key (with --package).")] = None,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Builder step cache.")] = None,
    threads: Annotated[int | None, typer.Option("--threads")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Build a base that onnxruntime-genai runs with per-request LoRA adapters."""
    with user_errors():
        from slmops_builder.train.adapters import build_adapter_base, dequantize_base, package_adapter_base
        from slmops_builder.train.runs import LoraSettings

        if package is not None and key is None:
            fail("--package needs --key")
        lora = LoraSettings(r=r, target_modules=tuple(t.strip() for t in target_modules.split(",") if t.strip()))
        with _err.status("converting ...") if not as_json else _nothing():
            base = build_adapter_base(model, lora, out, precision=precision, name=name, cache_dir=cache_dir,
                                      threads=threads)  # fmt: skip
        summary: dict[str, Any] = {"path": str(base.path), "precision": precision, "lora_inputs": len(base.inputs)}
        if dequantized is not None:
            if precision != "int4":
                fail("--dequantized needs --precision int4")
            summary["dequantized"] = str(dequantize_base(model, base.path, dequantized))
        if package is not None and key is not None:
            written = package_adapter_base(base, name=name, version=version, key=key, out=package)
            summary["package"] = {"path": str(written.path), "package_id": written.package_id}
        typer.echo(json.dumps(summary, indent=2)) if as_json else _out.print(summary)


def adapter_export(
    adapter: Annotated[Path, typer.Option("--adapter", "-a", help="PEFT adapter folder (finetune's out/adapter).")],
    base: Annotated[Path, typer.Option("--base", "-b", help="Adapter-ready base folder (from 'adapter-base').")],
    out: Annotated[Path, typer.Option("--out", "-o", help=".onnx_adapter file to write.")],
    package: Annotated[Path | None, typer.Option("--package", help="Also write a signed adapter package.")] = None,
    base_package: Annotated[
        Path | None, typer.Option("--base-package", help="The base's package (the adapter binds to its id).")
    ] = None,
    adapter_name: Annotated[
        str | None, typer.Option("--adapter-name", help="Name requests use [default: file stem].")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Package name [default: adapter name].")] = None,
    version: Annotated[str, typer.Option("--version")] = "1.0.0",
    key: Annotated[Path | None, typer.Option("--key", "-k")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Export a PEFT adapter for onnxruntime-genai multi-LoRA and optionally package it."""
    with user_errors():
        from slmops_builder.train.adapters import export_adapter, package_adapter

        if out.suffix != ".onnx_adapter":
            fail("--out must end in .onnx_adapter")
        if package is not None and (key is None or base_package is None):
            fail("--package needs --key and --base-package")
        info = export_adapter(adapter, base, out)
        summary: dict[str, Any] = {"path": str(out), **info}
        if package is not None and key is not None and base_package is not None:
            lineage: dict[str, Any] = {}
            run_summary = adapter.parent / "finetune.json"
            if run_summary.is_file():
                data = json.loads(run_summary.read_text())
                lineage["dataset_sha256"] = [h for h in (data.get("train_sha256"), data.get("validation_sha256")) if h]
                lineage["base_model"] = data.get("base_model", "")
            a_name = adapter_name or out.stem
            written = package_adapter(
                out,
                adapter_name=a_name,
                name=name or a_name,
                version=version,
                base_package=base_package,
                key=key,
                out=package,
                lineage=lineage,
            )
            summary["package"] = {
                "path": str(written.path),
                "package_id": written.package_id,
                "base_package_id": written.manifest.adapters[0].base_package_id,
                "bytes": written.manifest.evaluation.size_bytes,
            }
        typer.echo(json.dumps(summary, indent=2)) if as_json else _out.print(summary)


def register(app: typer.Typer) -> None:
    """Add the training commands to the builder's app."""
    app.command("task")(task)
    app.command("finetune")(finetune)
    app.command("distill")(distill)
    app.command("adapter-base")(adapter_base)
    app.command("adapter-export")(adapter_export)

"""The Olive fine-tuning engine (`engine == "olive"`): `olive finetune --method lora` in a subprocess.

The examples are rendered with the same text as the PEFT engine (the chat-template prompt, the answer,
eos) into a JSONL file of {"text": ...} rows that Olive loads with the `json` dataset builder. Olive runs
in a temporary folder (its cache and output stay there); its PEFT adapter is then moved into our layout
(out/adapter/), so `merge_adapter` and `adapter-export` take it like a PEFT-engine adapter.

Differences from the PEFT engine, all Olive's: float32 always (its bfloat16 default is slow and lossy on
CPU); LoRA dropout fixed at 0.05 (`olive finetune` has no option for it); examples are packed into
blocks of `max_length` tokens and the whole text is trained on (prompts included); constant learning
rate after `warmup_steps`. What Olive cannot do here (validation, early stopping, checkpoints, resume,
QLoRA) is refused, never silently dropped. The loss curve comes from the HF Trainer's state.

Olive's data loading needs the `datasets` package; without it the engine says so before starting.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slmops_builder.steps import offline_env
from slmops_builder.train.examples import Example
from slmops_builder.train.hf_models import load_tokenizer, prompt_text
from slmops_builder.train.run_output import finish_run
from slmops_builder.train.runs import ADAPTER_DIR, FinetuneConfig, FinetuneResult, ProgressEvent, ProgressFn

__all__ = [
    "OLIVE",
    "OLIVE_LORA_DROPOUT",
    "OliveEngine",
    "OliveEngineError",
    "OliveUnsupported",
    "check_olive",
    "finetune_olive",
    "olive_command",
    "olive_refusals",
]

OLIVE_LORA_DROPOUT = 0.05  # the LoRA pass's lora_dropout; `olive finetune` has no option for it
LOG_FILE = "olive.log"
TAIL_LINES = 40


class OliveEngineError(RuntimeError):
    """Olive is missing something it needs, or `olive finetune` failed (the message ends with its output)."""


class OliveUnsupported(ValueError):
    """An option the olive engine cannot honour was asked for."""


def check_olive() -> None:
    """Raise OliveEngineError naming what `olive finetune` needs and this environment lacks."""
    missing = [
        f"the {pkg} package (pip install {dist})"
        for pkg, dist in (("olive", "olive-ai"), ("datasets", "datasets"))
        if importlib.util.find_spec(pkg) is None
    ]
    if missing:
        raise OliveEngineError(
            "the olive engine needs " + " and ".join(missing) + " (Olive loads its training data with datasets); "
            "use --engine peft"
        )


def olive_refusals(cfg: FinetuneConfig, *, validation: Sequence[Example] = (), resume: bool = False) -> list[str]:
    """What was asked for that the olive engine cannot do (empty: nothing). Settings left at their
    defaults are not counted: only fields set explicitly (`model_fields_set`) and non-default runs."""
    asked = cfg.model_fields_set
    out = []
    if resume:
        out.append("--resume (Olive keeps no checkpoints of ours to resume from)")
    if validation:
        out.append("--validation (no validation loss, best adapter or early stopping)")
    if "patience" in asked and cfg.patience:
        out.append("--patience (no early stopping)")
    if "eval_every" in asked or "eval_examples" in asked:
        out.append("--eval-every (no validation loss)")
    if "save_every" in asked or "keep_checkpoints" in asked:
        out.append("--save-every (no checkpoints)")
    if cfg.qlora:
        out.append("--qlora (the olive engine runs plain LoRA in float32)")
    if cfg.precision not in ("auto", "fp32"):
        out.append(f"--precision {cfg.precision} (the olive engine runs in float32)")
    if abs(cfg.lora.dropout - OLIVE_LORA_DROPOUT) > 1e-9:
        out.append(f"--dropout {cfg.lora.dropout} (olive finetune fixes LoRA dropout at {OLIVE_LORA_DROPOUT})")
    return out


def olive_command(
    base_model: Path, data_file: Path, olive_out: Path, trainer_dir: Path, cfg: FinetuneConfig
) -> list[str]:
    """The `olive finetune` command line (HF training arguments pass through Olive to the Trainer)."""
    return [
        sys.executable,
        "-m",
        "olive",
        "finetune",
        "--model_name_or_path",
        str(base_model),
        "--output_path",
        str(olive_out),
        "--method",
        "lora",
        "--torch_dtype",
        "float32",
        "--lora_r",
        str(cfg.lora.r),
        "--lora_alpha",
        str(cfg.lora.alpha),
        "--target_modules",
        ",".join(cfg.lora.target_modules),
        "--data_name",
        "json",
        "--data_files",
        str(data_file),
        "--train_split",
        "train",
        "--text_field",
        "text",
        "--max_seq_len",
        str(cfg.max_length),
        "--log_level",
        "1",
        "--disable_telemetry",
        # HF TrainingArguments
        "--max_steps",
        str(cfg.max_steps),
        "--learning_rate",
        repr(cfg.learning_rate),
        "--per_device_train_batch_size",
        str(cfg.batch_size),
        "--gradient_accumulation_steps",
        str(cfg.grad_accum),
        "--warmup_steps",
        str(cfg.warmup_steps),
        "--gradient_checkpointing",
        str(cfg.gradient_checkpointing),
        "--seed",
        str(cfg.seed),
        "--output_dir",
        str(trainer_dir),
        "--logging_steps",
        "1",
        "--save_only_model",
        "True",
        "--save_total_limit",
        "1",
        "--disable_tqdm",
        "True",
    ]


def _write_texts(tokenizer: Any, examples: Sequence[Example], path: Path) -> int:
    """The PEFT engine's training text per example (prompt, answer, eos) as JSONL; returns its token count."""
    tokens = 0
    with path.open("w") as f:
        for ex in examples:
            text = prompt_text(tokenizer, ex.prompt_messages) + ex.output + tokenizer.eos_token
            tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
            f.write(json.dumps({"text": text}) + "\n")
    return tokens


def _tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _trainer_history(trainer_dir: Path) -> list[dict[str, Any]]:
    """Per-step training losses from the HF Trainer's last checkpoint (trainer_state.json's log_history)."""
    states = sorted(trainer_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    if not states:
        return []
    log = json.loads(states[-1].read_text()).get("log_history", [])
    return [
        {
            "step": int(row["step"]),
            "train_loss": float(row["loss"]),
            "val_loss": None,
            "lr": row.get("learning_rate"),
            "seconds": None,
        }
        for row in log
        if "loss" in row and "step" in row
    ]


def _check_adapter(adapter_dir: Path, cfg: FinetuneConfig) -> None:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    want = {
        "peft_type": "LORA",
        "r": cfg.lora.r,
        "lora_alpha": cfg.lora.alpha,
        "target_modules": sorted(cfg.lora.target_modules),
    }
    got = {
        "peft_type": config.get("peft_type"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": sorted(config.get("target_modules") or []),
    }
    if got != want:
        raise OliveEngineError(f"olive finetune wrote an adapter with {got}, not the asked-for {want}")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise OliveEngineError(f"olive finetune wrote no adapter_model.safetensors in {adapter_dir}")


def finetune_olive(
    base_model: Path,
    train: Sequence[Example],
    out_dir: Path,
    config: FinetuneConfig | None = None,
    *,
    validation: Sequence[Example] = (),
    resume: bool = False,
    merge: bool = False,
    progress: ProgressFn | None = None,
) -> FinetuneResult:
    """Train a LoRA adapter with `olive finetune` into the PEFT engine's layout (see the module doc)."""
    cfg = config or FinetuneConfig(engine="olive")
    if cfg.engine != "olive":
        cfg = cfg.model_copy(update={"engine": "olive"})
    base_model, out_dir = Path(base_model), Path(out_dir)
    refused = olive_refusals(cfg, validation=validation, resume=resume)
    if refused:
        raise OliveUnsupported("the olive engine cannot honour " + "; ".join(refused) + " (use --engine peft)")
    if not (base_model / "config.json").is_file():
        raise FileNotFoundError(f"{base_model} is not a model folder (no config.json)")
    if not train:
        raise ValueError("no training examples")
    leftovers = [p.name for p in out_dir.iterdir()] if out_dir.exists() else []
    if leftovers and leftovers != [LOG_FILE]:  # only the log of a failed olive run may be there
        raise FileExistsError(f"{out_dir} is not empty; choose a new folder")
    check_olive()
    tok = load_tokenizer(base_model, cfg.chat_template)
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter_dir = out_dir / ADAPTER_DIR
    with tempfile.TemporaryDirectory(prefix="slmops-olive-") as tmp_name:
        tmp = Path(tmp_name)
        data_file = tmp / "train.jsonl"
        tokens = _write_texts(tok, train, data_file)
        if tokens < cfg.max_length:
            raise ValueError(
                f"olive packs the examples into blocks of --max-length {cfg.max_length} tokens, and the "
                f"{len(train)} examples make only {tokens}: lower --max-length or add examples"
            )
        olive_out, trainer_dir = tmp / "olive-out", tmp / "trainer"
        cmd = olive_command(base_model.resolve(), data_file, olive_out, trainer_dir, cfg)
        # the JSON dataset's arrow cache dies with tmp
        env = offline_env(cfg.threads, HF_DATASETS_CACHE=str(tmp / "hf-datasets"))
        proc = subprocess.run(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log = proc.stdout or ""
        (out_dir / LOG_FILE).write_text(log)
        found = sorted(p.parent for p in olive_out.rglob("adapter_config.json")) if olive_out.is_dir() else []
        if proc.returncode != 0 or len(found) != 1:
            why = f"exit code {proc.returncode}" if proc.returncode else f"{len(found)} adapters in its output"
            raise OliveEngineError(
                f"olive finetune failed ({why}); full output in {out_dir / LOG_FILE}; its end:\n{_tail(log)}"
            )
        partial = adapter_dir.with_name(adapter_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(found[0], partial)
        try:
            _check_adapter(partial, cfg)
        except Exception:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        shutil.rmtree(adapter_dir, ignore_errors=True)
        partial.rename(adapter_dir)
        history = _trainer_history(trainer_dir)
    steps = history[-1]["step"] if history else cfg.max_steps
    if progress and history:
        last = history[-1]
        progress(ProgressEvent(last["step"], cfg.max_steps, last["train_loss"], None, time.perf_counter() - t0))
    return finish_run(
        base_model,
        out_dir,
        cfg,
        train,
        (),
        history,
        merge=merge,
        steps=steps,
        seconds=time.perf_counter() - t0,
        extra={"olive_command": cmd},
    )


class OliveEngine:
    name = "olive"

    def check(self, config: FinetuneConfig) -> None:
        pass  # what Olive needs is checked when it starts (check_olive), after the options it refuses

    def train(
        self,
        base_model: Path,
        train: Sequence[Example],
        out_dir: Path,
        config: FinetuneConfig,
        *,
        validation: Sequence[Example],
        resume: bool,
        merge: bool,
        progress: ProgressFn | None,
    ) -> FinetuneResult:
        return finetune_olive(
            base_model, train, out_dir, config, validation=validation, resume=resume, merge=merge, progress=progress
        )


OLIVE = OliveEngine()

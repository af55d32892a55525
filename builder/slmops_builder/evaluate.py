"""Evaluate a model folder the way a device runs it: onnxruntime-genai, greedy, on this CPU.

- `perplexity(folder, text)`: exp(mean next-token NLL) of `text`, from the logits onnxruntime-genai's
  generator returns for every appended token. The text is tokenized with the model's own tokenizer,
  cut to `max_tokens`, and scored in independent windows of `window` tokens (a fresh generator per
  window, so the first token of each window is context only); each window is appended in chunks of
  `PREFILL_CHUNK` tokens so the logits held at once stay small. Windows are clamped to the model's
  context length.
- `evaluate_folder(folder, prompts)`: load time, time to first token and decode tokens/s of the golden
  prompts (greedy, chat template applied as the agent does); their outputs become the references.
- `task_accuracy`: the mean score of the greedy answers to the `{input, output}` examples under the
  task's scorer (`train.scoring.TaskSpec`, a recipe's `[evaluation] task_scorer`; `task_scorer`
  gives the default: exact match of the stripped texts, or the "json" scorer under a task schema);
  each answer gets the reference's token count + 8 new tokens. With a task schema (a recipe's
  `[evaluation] task_schema`), the answers are held to that JSON Schema by onnxruntime-genai's
  guidance, as the agent's json_schema constraint holds them on a device, and `task_json_schema` = 1
  says so; with a task system prompt (a recipe's `[evaluation] task_system`), each chat starts with it.
- `evaluate_variant(folder, ...)`: all of the above in a fresh Python process, which also reports its
  peak resident memory after loading the model and answering the golden prompts (what a device
  serving the model holds, plus the interpreter and the runtime), before the perplexity pass whose
  logits buffers a device never allocates.

Metric names (the keys of `Evaluation.metrics`, copied into the manifest): `load_ms`, `ttft_ms`,
`decode_tps`, `peak_rss_mb`, `perplexity`, `task_accuracy`, `task_json_schema` (1: measured with the
schema; absent: free decoding), `size_mb`.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from slmops_builder.train.scoring import TaskSpec

__all__ = [
    "DEFAULT_GOLDEN_PROMPTS",
    "PREFILL_CHUNK",
    "Evaluation",
    "EvaluationError",
    "GoldenPromptSpec",
    "TaskExample",
    "evaluate_folder",
    "evaluate_variant",
    "folder_size_bytes",
    "heldout_text",
    "load_tasks",
    "perplexity",
    "task_accuracy",
    "task_scorer",
]

PREFILL_CHUNK = 128
_MIB = 1024**2


class EvaluationError(RuntimeError):
    """A model folder could not be evaluated (does not load, or the evaluation process failed)."""


@dataclass(frozen=True)
class GoldenPromptSpec:
    """A golden prompt: `prompt` is the user message; the device applies the chat template."""

    prompt: str
    max_new_tokens: int = 24
    reference: str = ""  # filled by the builder's own greedy run when empty


DEFAULT_GOLDEN_PROMPTS: tuple[GoldenPromptSpec, ...] = (GoldenPromptSpec("What is the capital of France?", 24),)


@dataclass(frozen=True)
class TaskExample:
    """One example of a task set: the user message and the exact answer expected."""

    input: str
    output: str


@dataclass
class Evaluation:
    references: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def heldout_text() -> str:
    """The held-out English prose shipped with the builder (written for it; no licence attached)."""
    return files("slmops_builder").joinpath("data/heldout.txt").read_text(encoding="utf-8")


def load_tasks(path: Path) -> list[TaskExample]:
    """Read a task set: JSON Lines of `{"input": str, "output": str}`; errors name the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"task set not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"task set {path} cannot be read: {exc}") from exc
    out: list[TaskExample] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{n}: not JSON: {exc}") from None
        if not isinstance(item, dict) or set(item) != {"input", "output"}:
            raise ValueError(f"{path}:{n}: expected an object with exactly the keys 'input' and 'output'")
        if not isinstance(item["input"], str) or not isinstance(item["output"], str):
            raise ValueError(f"{path}:{n}: 'input' and 'output' must be strings")
        out.append(TaskExample(item["input"], item["output"]))
    if not out:
        raise ValueError(f"task set {path} has no examples")
    return out


def folder_size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _load(folder: Path, threads: int | None) -> tuple[Any, Any, float]:
    """(model, tokenizer, load ms), configured as the agent configures it."""
    import onnxruntime_genai as og

    folder = Path(folder)
    if not (folder / "genai_config.json").is_file():
        raise EvaluationError(f"{folder} is not an onnxruntime-genai model folder (no genai_config.json)")
    cfg = og.Config(str(folder))
    n = threads or 2
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": n}}}}))
    t0 = time.monotonic()
    model = og.Model(cfg)
    load_ms = (time.monotonic() - t0) * 1000
    return model, og.Tokenizer(model), load_ms


def _context_length(folder: Path) -> int:
    cfg = json.loads((Path(folder) / "genai_config.json").read_text())
    return int(cfg["model"]["context_length"])


def perplexity(
    folder: Path, text: str, *, max_tokens: int = 1024, window: int = 512, threads: int | None = None
) -> float:
    """Perplexity of `text` under the model in `folder` (see the module doc for the windows)."""
    model, tok, _ = _load(folder, threads)
    return _perplexity(model, tok, text, max_tokens=max_tokens, window=min(window, _context_length(folder)))


def _perplexity(model: Any, tok: Any, text: str, *, max_tokens: int, window: int) -> float:
    import numpy as np
    import onnxruntime_genai as og

    if max_tokens < 2 or window < 2:
        raise ValueError("perplexity needs max_tokens >= 2 and window >= 2")
    ids = [int(i) for i in tok.encode(text)][:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"text too short for perplexity: {len(ids)} token(s)")
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:  # a lone trailing token has no target within its window
            break
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(chunk))
        gen = og.Generator(model, params)
        for s in range(0, len(chunk), PREFILL_CHUNK):
            piece = chunk[s : s + PREFILL_CHUNK]
            gen.append_tokens(piece)
            targets = np.asarray(chunk[s + 1 : s + 1 + len(piece)])
            if not len(targets):
                break
            logits = np.asarray(gen.get_output("logits"))[0, : len(targets)].astype(np.float64)
            top = logits.max(axis=1)
            lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
            total += float((lse - logits[np.arange(len(targets)), targets]).sum())
            count += len(targets)
        del gen
    return math.exp(total / count)


def evaluate_folder(folder: Path, prompts: Sequence[GoldenPromptSpec], *, threads: int | None = None) -> Evaluation:
    """Load `folder` with onnxruntime-genai and run each prompt greedily; measure time to first
    token and decode speed. Raises if the folder does not load: a package must."""
    model, tok, load_ms = _load(folder, threads)
    out = _golden(model, tok, prompts)
    out.metrics["load_ms"] = load_ms
    return out


def _golden(model: Any, tok: Any, prompts: Sequence[GoldenPromptSpec]) -> Evaluation:
    out = Evaluation()
    ttfts: list[float] = []
    tps: list[float] = []
    for p in prompts:
        tokens, ttft, rate = _generate(model, tok, p.prompt, p.max_new_tokens)
        ttfts.append(ttft)
        if rate is not None:
            tps.append(rate)
        out.references.append(tok.decode(tokens))
    out.metrics = {"ttft_ms": _median(ttfts)}
    if tps:
        out.metrics["decode_tps"] = _median(tps)
    return out


def _generate(
    model: Any,
    tok: Any,
    prompt: str,
    max_new_tokens: int,
    json_schema: str | None = None,
    system: str | None = None,
) -> tuple[list[int], float, float | None]:
    """Greedy answer to one user message, after `system` when given (held to `json_schema` when
    given): (tokens, time to first token in ms, decode tokens/s or None)."""
    import onnxruntime_genai as og

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tok.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
    ids = tok.encode(text)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + max_new_tokens)
    if json_schema is not None:
        params.set_guidance("json_schema", json_schema)
    gen = og.Generator(model, params)
    start = time.monotonic()
    gen.append_tokens(ids)
    tokens: list[int] = []
    first = start
    while not gen.is_done() and len(tokens) < max_new_tokens:
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
        if len(tokens) == 1:
            first = time.monotonic()
    end = time.monotonic()
    del gen
    rate = (len(tokens) - 1) / (end - first) if len(tokens) > 1 and end > first else None
    return tokens, (first - start) * 1000, rate


def task_scorer(name: str | None = None, pattern: str | None = None, json_schema: str | None = None) -> TaskSpec:
    """The scorer `name` (a `scoring.SCORERS` name; `pattern` for "regex"), by default exact match of
    the stripped texts, or the "json" scorer when the answers are held to `json_schema`."""
    return TaskSpec(scorer=name or ("json" if json_schema is not None else "exact"), pattern=pattern)  # type: ignore[arg-type]


def task_accuracy(
    model: Any,
    tok: Any,
    tasks: Sequence[TaskExample],
    json_schema: str | None = None,
    system: str | None = None,
    scorer: TaskSpec | None = None,
) -> float:
    """Mean score of the greedy answers under `scorer` (default: `task_scorer(json_schema=...)`); with
    `json_schema`, the answers are held to it; `system` starts each chat."""
    spec = scorer if scorer is not None else task_scorer(json_schema=json_schema)
    total = 0.0
    for t in tasks:
        budget = len(tok.encode(t.output)) + 8
        tokens, _, _ = _generate(model, tok, t.input, budget, json_schema, system)
        total += spec.example_score(tok.decode(tokens).strip(), t.output)
    return total / len(tasks)


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if s else 0.0


def evaluate_variant(
    folder: Path,
    prompts: Sequence[GoldenPromptSpec],
    *,
    text: str | None = None,
    tasks: Sequence[TaskExample] = (),
    task_schema: str | None = None,
    task_system: str | None = None,
    task_scorer: TaskSpec | None = None,
    threads: int | None = None,
    max_tokens: int = 1024,
    window: int = 512,
    timeout_s: float = 3600,
) -> Evaluation:
    """Every metric of one model folder, measured in a fresh process (see the module doc)."""
    folder = Path(folder)
    request = {
        "folder": str(folder.resolve()),
        "prompts": [{"prompt": p.prompt, "max_new_tokens": p.max_new_tokens} for p in prompts],
        "text": text,
        "tasks": [asdict(t) for t in tasks],
        "task_schema": task_schema,
        "task_system": task_system,
        "task_scorer": task_scorer.model_dump(include={"scorer", "pattern"}) if task_scorer else None,
        "threads": threads,
        "max_tokens": max_tokens,
        "window": window,
    }
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "slmops_builder.evaluate"],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            env={**os.environ, "OMP_NUM_THREADS": str(threads or 2)},
        )
    except subprocess.TimeoutExpired:
        raise EvaluationError(f"evaluating {folder} took longer than {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
        raise EvaluationError(f"evaluating {folder} failed (exit {proc.returncode}): {tail}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = {k: float(v) for k, v in result["metrics"].items()}
    metrics["size_mb"] = folder_size_bytes(folder) / _MIB
    return Evaluation(references=list(result["references"]), metrics=metrics)


def _peak_rss_mb() -> float:
    """This process's peak resident memory. Linux: VmHWM, which execve resets (ru_maxrss does not: it
    would report the builder's own peak, inherited through fork); elsewhere ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / _MIB if sys.platform == "darwin" else peak / 1024


def _serve_request(request: dict[str, Any]) -> dict[str, Any]:
    folder = Path(request["folder"])
    model, tok, load_ms = _load(folder, request["threads"])
    prompts = [GoldenPromptSpec(p["prompt"], int(p["max_new_tokens"])) for p in request["prompts"]]
    ev = _golden(model, tok, prompts) if prompts else Evaluation()
    metrics: dict[str, float] = {"load_ms": load_ms, **ev.metrics, "peak_rss_mb": _peak_rss_mb()}
    if request["tasks"]:
        schema = request.get("task_schema")
        scorer = TaskSpec(**request["task_scorer"]) if request.get("task_scorer") else None
        metrics["task_accuracy"] = task_accuracy(
            model, tok, [TaskExample(**t) for t in request["tasks"]], schema, request.get("task_system"), scorer
        )
        if schema is not None:
            metrics["task_json_schema"] = 1.0
    if request["text"]:
        window = min(int(request["window"]), _context_length(folder))
        metrics["perplexity"] = _perplexity(
            model, tok, request["text"], max_tokens=int(request["max_tokens"]), window=window
        )
    return {"metrics": metrics, "references": ev.references}


def main() -> None:
    """`python -m slmops_builder.evaluate`: one JSON request on stdin, one JSON result line on stdout."""
    result = _serve_request(json.loads(sys.stdin.read()))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

"""Builder benchmark: every CPU profile of SmolLM2-135M-Instruct, side by side (run by hand, not in CI).

For each profile: build it (the builder's convert step; a cached build reports the time it took when
it ran), then evaluate it in a fresh process the way a device runs it (slmops_builder.evaluate:
onnxruntime-genai, greedy, `--threads` intra-op threads): size on disk, perplexity on the builder's
held-out text, time to first token and decode tokens/s. Ratios are against `cpu-fp32`, whose weights
are the dequantized Q4_1 GGUF the model ships as. Then checks the issue's targets:

- lossless GGUF import: ppl <= 1.001x fp32, size <= 30% of fp32, decode >= 0.85x the RTN int4 profile;
- the fastest int4 profile decodes >= 2.5x fp32;
- the best quantizer applied to the fp32 weights (RTN, k-quant, Olive's GPTQ) has ppl <= 1.10x.

    .venv/bin/python benchmarks/builder_bench.py [--profiles cpu-int4,cpu-fp32] [--json out.json]

The model is imported once into `--work` (default .cache/builder-bench at the repository root) and
conversions are kept in the builder's step cache there. Timing figures move with the machine's load
(other processes on a shared machine); compare ratios within one run.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
REFERENCE = "cpu-fp32"
PROMPTS = (
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works to a child.",
    "List five ideas for a rainy weekend and say why each is fun.",
)

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


@dataclass
class Row:
    profile: str
    method: str
    engine: str
    size_mb: float
    ppl: float
    decode_tps: float
    ttft_ms: float
    build_s: float

    def as_json(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def _model(work: Path) -> Path:
    from slmops_builder.importer import import_model

    folder = work / "smollm2-hf"
    if not (folder / "slmops_source.json").is_file():
        import_model("smollm2", folder)
    return folder


def _measure(model_dir: Path, name: str, cache: Path, threads: int, max_tokens: int, console: Console) -> Row:
    from slmops_builder.convert import convert
    from slmops_builder.evaluate import GoldenPromptSpec, evaluate_variant, heldout_text
    from slmops_builder.profiles import get_profile

    profile = get_profile(name)
    with console.status(f"building {name}"):
        built = convert(model_dir, profile, cache_dir=cache, threads=threads)
    with console.status(f"evaluating {name}"):
        ev = evaluate_variant(
            built.path,
            [GoldenPromptSpec(p, 128) for p in PROMPTS],
            text=heldout_text(),
            threads=threads,
            max_tokens=max_tokens,
        )
    m = ev.metrics
    console.log(f"{name}: {'cached build' if built.cached else 'built'} in {built.seconds:.0f} s; {m}")
    return Row(
        name,
        profile.method,
        profile.engine,
        m["size_mb"],
        m["perplexity"],
        m["decode_tps"],
        m["ttft_ms"],
        built.seconds,
    )


def _checks(rows: dict[str, Row]) -> list[tuple[str, bool | None, str]]:
    """(target, met or None when a profile it needs was not run, the figures)."""
    ref = rows.get(REFERENCE)
    out: list[tuple[str, bool | None, str]] = []
    if ref is None:
        return [("every target is relative to cpu-fp32", None, "cpu-fp32 not run")]
    rtn = rows.get("cpu-int4")
    for r in (r for r in rows.values() if r.method == "lossless-gguf"):
        ppl, size = r.ppl / ref.ppl, r.size_mb / ref.size_mb
        out.append((f"{r.profile}: ppl <= 1.001x fp32", ppl <= 1.001, f"{ppl:.4f}x"))
        out.append((f"{r.profile}: size <= 30% of fp32", size <= 0.30, f"{size:.1%}"))
        if rtn is not None:
            speed = r.decode_tps / rtn.decode_tps
            out.append((f"{r.profile}: decode >= 0.85x cpu-int4", speed >= 0.85, f"{speed:.2f}x"))
    int4 = [r for r in rows.values() if r.profile.startswith("cpu-int4")]
    if int4:
        best = max(int4, key=lambda r: r.decode_tps)
        speed = best.decode_tps / ref.decode_tps
        out.append((f"fastest int4 ({best.profile}) >= 2.5x fp32 decode", speed >= 2.5, f"{speed:.2f}x"))
    requant = [r for r in rows.values() if r.method in ("rtn", "k_quant", "gptq") and r.profile.startswith("cpu-int4")]
    if requant:
        best = min(requant, key=lambda r: r.ppl)
        ratios = ", ".join(f"{r.profile} {r.ppl / ref.ppl:.3f}x" for r in requant)
        out.append(
            (f"best int4 quantizer of fp32 weights ({best.profile}) ppl <= 1.10x", best.ppl / ref.ppl <= 1.10, ratios)
        )
    return out


@app.command()
def main(
    profiles: Annotated[str, typer.Option(help="Comma-separated profiles (default: every CPU profile).")] = "",
    threads: Annotated[int, typer.Option(help="Intra-op threads for building and evaluating.")] = 2,
    max_tokens: Annotated[int, typer.Option(help="Held-out tokens scored for perplexity.")] = 1024,
    work: Annotated[Path, typer.Option(help="Imported model and step cache.")] = REPO / ".cache" / "builder-bench",
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the figures as JSON here.")] = None,
) -> None:
    """Build and evaluate every CPU profile of SmolLM2-135M; print one table and check the targets."""
    from slmops_builder.profiles import PROFILES, get_profile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    console = Console(stderr=True)
    names = [p.strip() for p in profiles.split(",") if p.strip()] or [
        p.name for p in PROFILES.values() if p.execution_provider == "cpu"
    ]
    for n in names:
        get_profile(n)  # unknown names fail before the slow part
    if REFERENCE in names:  # the reference first, so a failure there stops the run early
        names.remove(REFERENCE)
        names.insert(0, REFERENCE)
    work.mkdir(parents=True, exist_ok=True)
    with console.status("importing SmolLM2-135M-Instruct"):
        model_dir = _model(work)
    rows = {n: _measure(model_dir, n, work / "steps", threads, max_tokens, console) for n in names}

    ref = rows.get(REFERENCE)
    table = Table(title=f"SmolLM2-135M-Instruct, every CPU profile ({threads} threads; ratios vs {REFERENCE})")
    for col in (
        "profile",
        "method",
        "engine",
        "size MB",
        "size x",
        "ppl",
        "ppl x",
        "decode tok/s",
        "decode x",
        "TTFT ms",
        "build s",
    ):
        table.add_column(col, justify="left" if col in ("profile", "method", "engine") else "right")
    for r in rows.values():
        table.add_row(
            r.profile,
            r.method,
            r.engine,
            f"{r.size_mb:.1f}",
            f"{r.size_mb / ref.size_mb:.3f}" if ref else "",
            f"{r.ppl:.3f}",
            f"{r.ppl / ref.ppl:.4f}" if ref else "",
            f"{r.decode_tps:.1f}",
            f"{r.decode_tps / ref.decode_tps:.2f}" if ref else "",
            f"{r.ttft_ms:.0f}",
            f"{r.build_s:.0f}",
        )
    out = Console(width=max(Console().width, 132))
    out.print(table)
    for target, met, figures in _checks(rows):
        mark = {True: "[green]met[/]", False: "[red]NOT met[/]", None: "[yellow]not checked[/]"}[met]
        out.print(f"{mark}  {target}: {figures}")
    if json_path is not None:
        data = {"reference": REFERENCE, "threads": threads, "rows": [r.as_json() for r in rows.values()]}
        json_path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(app())

"""The options distill and finetune share for the user's own task and the package they can build.

The task's system prompt, scorer and validity rule (`scoring.TaskSpec`), and `--package-profile`: the
trained model's package built and scored on the held-out examples (`retention.package_retention`),
its figures shown as a table. Checks of these options run before any long work.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from slmops_builder.cli_errors import err_console, fail

__all__ = [
    "CacheDirOpt",
    "KeyOpt",
    "MaxCharsOpt",
    "PackageProfileOpt",
    "PackageVersionOpt",
    "PatternOpt",
    "ScorerOpt",
    "SystemOpt",
    "ValidOpt",
    "check_package_options",
    "retention",
    "retention_table",
    "task_spec",
]

# The task's own system prompt, scorer and validity rule (`scoring.TaskSpec`), and the package whose
# retention distill and finetune --merge report (`retention.package_retention`).
SystemOpt = Annotated[
    str | None, typer.Option("--system", help="System prompt for the records without one [default: none].")
]
ScorerOpt = Annotated[
    str,
    typer.Option(
        "--scorer",
        help="How answers are scored: json (exact JSON match), exact, contains, regex (--pattern), f1 (token F1) "
        "or rouge_l.",
    ),
]
ValidOpt = Annotated[
    str | None,
    typer.Option(
        "--valid",
        help="Which answers are valid (the teacher's answers distillation keeps): json (a JSON object), regex "
        "(--pattern in full) or text (non-empty, at most --max-chars) [default: json for --scorer json, regex for "
        "regex, else text].",
    ),
]
PatternOpt = Annotated[str | None, typer.Option("--pattern", help="The regex of --scorer regex and --valid regex.")]
MaxCharsOpt = Annotated[int, typer.Option("--max-chars", help="The longest valid answer of --valid text.")]
PackageProfileOpt = Annotated[
    str | None,
    typer.Option(
        "--package-profile",
        help="Also build the trained model's package for this profile (signed with --key, into OUT/package) and "
        "score the task on it in onnxruntime-genai: retention figures (needs --test).",
    ),
]
KeyOpt = Annotated[Path | None, typer.Option("--key", "-k", help="Signing key of --package-profile's package.")]
PackageVersionOpt = Annotated[str, typer.Option("--package-version", help="Version of --package-profile's package.")]
CacheDirOpt = Annotated[Path | None, typer.Option("--cache-dir", help="Builder step cache (conversions).")]


def task_spec(system: str | None, scorer: str, valid: str | None, pattern: str | None, max_chars: int) -> Any:
    from slmops_builder.train.scoring import SCORERS, VALIDITY_RULES, TaskSpec

    if scorer not in SCORERS:
        fail(f"--scorer must be one of {', '.join(SCORERS)}, not {scorer!r}")
    if valid is not None and valid not in VALIDITY_RULES:
        fail(f"--valid must be one of {', '.join(VALIDITY_RULES)}, not {valid!r}")
    return TaskSpec(system=system, scorer=scorer, valid=valid, pattern=pattern, max_chars=max_chars)  # type: ignore[arg-type]


def check_package_options(profile: str | None, key: Path | None, test: Path | None, version: str) -> None:
    """Refuse --package-profile without what it needs, before any long work."""
    if profile is None:
        return
    from slmops_builder.build import check_name_version
    from slmops_builder.keys import load_private_key
    from slmops_builder.train.retention import check_profile

    if key is None or test is None:
        fail("--package-profile needs --key (to sign the package) and --test (to score it)")
    check_profile(profile)
    check_name_version("model", version)
    load_private_key(key)


def retention(
    model_dir: Path,
    profile: str,
    examples: list[Any],
    task: Any,
    scores: dict[str, float],
    *,
    key: Path,
    out: Path,
    name: str,
    version: str,
    cache_dir: Path | None,
    threads: int | None,
    max_new_tokens: int,
    quiet: bool,
) -> dict[str, Any]:
    from slmops_builder.settings import BuilderSettings
    from slmops_builder.train.retention import package_retention

    settings = BuilderSettings(cache_dir=cache_dir) if cache_dir else BuilderSettings()
    with err_console.status(f"building and scoring the {profile} package ...") if not quiet else nullcontext():
        result = package_retention(
            model_dir, profile, examples, task, scores, key=key, out=out, name=name, version=version,
            cache_dir=settings.cache_dir, threads=threads or settings.threads, max_new_tokens=max_new_tokens,
        )  # fmt: skip
    return result.to_json()


def retention_table(retention: dict[str, Any]) -> Table:
    table = Table(title=f"retention: {retention['scorer']} score on {retention['examples']} held-out examples")
    for col in ("model", "score", "package keeps"):
        table.add_column(col)
    for name, value in retention["scores"].items():
        kept = retention["retention"].get(f"package/{name}")
        table.add_row(
            f"{retention['profile']} package" if name == "package" else name,
            f"{value:.4f}",
            "-" if name == "package" else ("n/a" if kept is None else f"{kept:.1%}"),
        )
    return table

"""`slmops builder ...`: keys and key statements, import, build, inspect, verify.

Cheap to import: torch, transformers and onnxruntime-genai are imported inside the commands
(through the modules they call). User errors print one clear line and exit non-zero.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from slmops_builder.cli_errors import EXIT_GATES_FAILED, err_console, fail, user_errors

__all__ = ["app"]

app = typer.Typer(
    help="Build, quantize, evaluate and sign model packages.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_out = Console(soft_wrap=True)
_err = err_console


def _settings(cache_dir: Path | None = None, threads: int | None = None) -> Any:
    from slmops_builder.settings import BuilderSettings

    overrides: dict[str, Any] = {}
    if cache_dir is not None:
        overrides["cache_dir"] = cache_dir
    if threads is not None:
        overrides["threads"] = threads
    return BuilderSettings(**overrides)


@app.command()
def keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="Private key file (PEM) to write; public key: OUT.pub.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing key.")] = False,
) -> None:
    """Create an Ed25519 package-signing key."""
    with user_errors():
        from slmops_builder.keys import generate_key, public_path
        from slmops_protos.manifests import key_id

        key = generate_key(out, overwrite=force)
        _out.print(f"private key: {out}  (keep it secret)")
        _out.print(f"public key:  {public_path(out)}  (give it to the fleet and devices)")
        _out.print(f"key id:      {key_id(key.public_key())}")


@app.command("key-statement")
def key_statement(
    out: Annotated[Path, typer.Option("--out", "-o", help="Signed statement file to write.")],
    sign_with: Annotated[
        list[Path],
        typer.Option("--sign-with", "-k", help="Private key the fleet and devices trust now (repeatable)."),
    ],
    sequence: Annotated[
        int, typer.Option("--sequence", "-s", help="Greater than the last applied ('slmops fleet keys list').")
    ],
    add: Annotated[list[Path] | None, typer.Option("--add", help="Public key (.pub) to trust (repeatable).")] = None,
    retire: Annotated[
        list[Path] | None, typer.Option("--retire", help="Public key (.pub) never to trust again (repeatable).")
    ] = None,
    note: Annotated[str, typer.Option("--note", help="Why, for people.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print the statement as JSON.")] = False,
) -> None:
    """Write a signed key statement: trust new package-signing keys and retire old ones, without
    enrolling devices again. Apply it with 'slmops fleet keys apply'; the fleet passes it to every
    device (also those offline now, when they reconnect)."""
    with user_errors():
        from slmops_builder.keys import key_statement as make_statement
        from slmops_builder.keys import load_private_key, load_public_key
        from slmops_protos.manifests import key_id

        added = [load_public_key(p) for p in add or []]
        retired = [load_public_key(p) for p in retire or []]
        signed = make_statement(
            sequence, [load_private_key(p) for p in sign_with], add=added, retire=retired, note=note
        )
        out.write_bytes(signed.SerializeToString())
        adds, retires = [key_id(k) for k in added], [key_id(k) for k in retired]
        signers = [s.key_id for s in signed.signatures]
        if as_json:
            data = {"path": str(out), "sequence": sequence, "add": adds, "retire": retires, "signed_by": signers}
            typer.echo(json.dumps(data, indent=2))
            return
        _out.print(f"key statement {sequence} written to {out}, signed by {', '.join(signers)}")
        for k in adds:
            _out.print(f"  add     {k}")
        for k in retires:
            _out.print(f"  retire  {k}")


@app.command("import")
def import_(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the HF model into (new or empty).")],
    source: Annotated[
        str, typer.Argument(help="'smollm2' (the bundled SmolLM2-135M-Instruct GGUF), a .gguf file or an HF folder.")
    ] = "smollm2",
    profile: Annotated[
        list[str] | None,
        typer.Option(
            "--profile", "-p", help="A profile the model is for (repeatable): refused first if it cannot build it."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Import a base model into a Hugging Face folder (fp32 safetensors + tokenizer). Its architecture
    must be one the builder lists (`slmops builder profiles` shows what each builds)."""
    with user_errors():
        from slmops_builder.importer import import_model
        from slmops_builder.profiles import get_profile

        profiles = [get_profile(p) for p in profile or []]
        with _err.status(f"importing {source} ..."):
            result = import_model(source, out, profiles=profiles)
        data = {
            "path": str(result.path),
            "source": result.source,
            "source_sha256": result.source_sha256,
            "architecture": result.architecture,
            "num_parameters": result.num_parameters,
            "seconds": round(result.seconds, 2),
        }
        if as_json:
            typer.echo(json.dumps(data, indent=2))
        else:
            _out.print(
                f"imported {result.architecture} ({result.num_parameters / 1e6:.1f}M parameters) "
                f"into {result.path} in {result.seconds:.1f} s"
            )


@app.command()
def build(
    recipe: Annotated[
        Path | None,
        typer.Argument(help="A recipe (.toml): build, evaluate, gate and sign every profile it names."),
    ] = None,
    model: Annotated[
        Path | None, typer.Option("--model", "-m", help="HF model folder (from 'slmops builder import').")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", "-n", help="Package name, e.g. smollm2-135m-instruct.")] = None,
    version: Annotated[str | None, typer.Option("--version", "-v", help="Semantic version, e.g. 1.0.0.")] = None,
    key: Annotated[
        Path | None, typer.Option("--key", "-k", help="Private signing key (from 'slmops builder keygen').")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Package folder to write (replaced if it exists); with a recipe: its output."),
    ] = None,
    profile: Annotated[
        str | None, typer.Option("--profile", "-p", help="Hardware profile [default: cpu-int4].")
    ] = None,
    search: Annotated[
        list[str] | None,
        typer.Option("--search", "-s", help="Generation default for genai_config.json, key=value (repeatable)."),
    ] = None,
    prompt: Annotated[
        list[str] | None, typer.Option("--golden-prompt", help="Golden prompt (user message), repeatable.")
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option("--cache-dir", help="Step cache [default: $SLMOPS_CACHE_DIR or ~/.cache/slmops/builder]."),
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="Threads for conversion and evaluation.")] = None,
    security_version: Annotated[
        int | None,
        typer.Option(
            "--security-version",
            min=0,
            help="Devices refuse a package below the highest security version they committed [default: 0].",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="With a recipe: print the steps and cache hits, run nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON (no progress display).")] = False,
) -> None:
    """Convert a model for a hardware profile, evaluate it, and write a signed package; or, given a
    recipe file, do that for every profile it names, gate each variant, and write a report.

    Exit codes: 0 done; 1 bad input; 4 a recipe's gates left a profile (or its fallback chain) without a package.
    """
    with user_errors():
        if recipe is not None:
            single: dict[str, object] = {"--model": model, "--name": name, "--version": version, "--profile": profile}
            single |= {"--search": search, "--golden-prompt": prompt, "--security-version": security_version}
            given = [flag for flag, value in single.items() if value]
            if given:
                fail(f"{', '.join(given)} cannot be combined with a recipe (set them in {recipe})")
            if recipe.suffix.lower() != ".toml":
                fail(f"{recipe} is not a recipe (.toml); for a single package use --model")
            _build_recipe(recipe, key, out, cache_dir, threads, dry_run=dry_run, as_json=as_json)
            return
        if dry_run:
            fail("--dry-run needs a recipe file")
        missing = [f for f, v in (("--model", model), ("--name", name), ("--version", version)) if v is None]
        missing += [f for f, v in (("--key", key), ("--out", out)) if v is None]
        if missing:
            fail(f"missing {', '.join(missing)} (or give a recipe file)")
        assert model is not None and name is not None and version is not None and key is not None and out is not None
        _build_one(
            model, name, version, key, out, profile or "cpu-int4", search, prompt, cache_dir, threads, as_json,
            security_version or 0,
        )  # fmt: skip


def _build_one(
    model: Path,
    name: str,
    version: str,
    key: Path,
    out: Path,
    profile: str,
    search: list[str] | None,
    prompt: list[str] | None,
    cache_dir: Path | None,
    threads: int | None,
    as_json: bool,
    security_version: int,
) -> None:
    from slmops_builder.build import STEPS, build_package, check_name_version
    from slmops_builder.convert import parse_search_overrides
    from slmops_builder.keys import load_private_key
    from slmops_builder.profiles import get_profile

    prof = get_profile(profile)
    check_name_version(name, version)
    overrides = parse_search_overrides(search or [])
    if not (model / "config.json").is_file():
        fail(f"no model folder at {model} (no config.json); create one with 'slmops builder import'")
    load_private_key(key)
    settings = _settings(cache_dir, threads)
    written, events = _run_build(
        lambda progress: build_package(
            model,
            prof,
            name,
            version,
            key,
            out,
            search=overrides,
            golden_prompts=prompt or None,
            cache_dir=settings.cache_dir,
            threads=settings.threads,
            progress=progress,
            security_version=security_version,
        ),
        [(s, "") for s in STEPS],
        quiet=as_json,
    )
    summary = {
        "package_id": written.package_id,
        "path": str(written.path),
        "name": written.manifest.name,
        "version": written.manifest.version,
        "security_version": written.manifest.security_version,
        "profile": written.manifest.profile.name,
        "files": len(written.manifest.files),
        "size_bytes": written.manifest.evaluation.size_bytes,
        "metrics": dict(written.manifest.evaluation.metrics),
        "steps": {e.step: {"seconds": round(e.seconds, 3), "detail": e.detail} for e in events},
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    table = Table(title=f"package {written.manifest.name} {written.manifest.version} ({prof.name})")
    table.add_column("file")
    table.add_column("size", justify="right")
    table.add_column("sha256")
    for f in sorted(written.manifest.files, key=lambda f: f.path):
        table.add_row(f.path, _size(f.size), f.sha256[:16])
    _out.print(table)
    _out.print(f"package id: [bold]{written.package_id}[/]")
    _out.print(f"written to: {written.path}  ({_size(written.manifest.evaluation.size_bytes)})")


def _build_recipe(
    path: Path,
    key: Path | None,
    out: Path | None,
    cache_dir: Path | None,
    threads: int | None,
    *,
    dry_run: bool,
    as_json: bool,
) -> None:
    from slmops_builder.recipe_plan import plan_recipe, progress_steps
    from slmops_builder.recipe_run import REPORT_FILE, build_recipe
    from slmops_builder.recipe_schema import load_recipe
    from slmops_builder.report import variants_table, verdict_lines

    loaded = load_recipe(path)
    settings = _settings(cache_dir, threads)
    n = threads or loaded.recipe.evaluation.threads or settings.threads
    if dry_run:
        plan = plan_recipe(loaded, cache_dir=settings.cache_dir, threads=n)
        output = out if out is not None else loaded.output
        if as_json:
            data = {"recipe": str(path), "output": str(output), "steps": [p.to_dict() for p in plan]}
            typer.echo(json.dumps(data, indent=2))
            return
        table = Table(title=f"plan: {loaded.recipe.name} {loaded.recipe.version} -> {output}")
        for col in ("step", "target", "cache", "key"):
            table.add_column(col)
        for p in plan:
            cache = "hit" if p.cached else ("miss" if p.key else "-")
            table.add_row(p.step, p.target, cache, (p.key or "")[:16])
        _out.print(table)
        return
    if key is None:
        fail("missing --key (the private signing key)")
    from slmops_builder.keys import load_private_key

    load_private_key(key)
    result, _ = _run_build(
        lambda progress: build_recipe(
            loaded, key, cache_dir=settings.cache_dir, threads=n, output=out, progress=progress
        ),
        progress_steps(loaded),
        quiet=as_json,
    )
    report = result.to_dict()
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _out.print(variants_table(report))
        for line in verdict_lines(report):
            _out.print(escape(line), highlight=False)
        for v in result.variants:
            if v.package_id:
                _out.print(f"{v.profile}: package [bold]{v.package_id}[/] in {v.package_path}")
        _out.print(f"report: {result.output / REPORT_FILE}")
    if not result.ok:
        failed = [f"{v.profile} ({v.reason})" for v in result.variants if v.verdict == "failed gates"]
        fail("gates left a profile without a package: " + "; ".join(failed), EXIT_GATES_FAILED)


def _run_build(call: Any, rows: list[tuple[str, str]], *, quiet: bool) -> tuple[Any, list[Any]]:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    done: list[Any] = []
    if quiet:

        def record(event: Any) -> None:
            if event.status == "done":
                done.append(event)

        return call(record), done
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=_err, transient=False
    ) as progress:
        tasks = {(s, t): progress.add_task(f"[dim]{s} {t}".rstrip(), total=1, start=False) for s, t in rows}

        def show(event: Any) -> None:
            label = f"{event.step} {event.target}".rstrip()
            task = tasks.get((event.step, event.target))
            if task is None:
                task = tasks[(event.step, event.target)] = progress.add_task(label, total=1, start=False)
            if event.status == "start":
                started.add(task)
                progress.start_task(task)
                progress.update(task, description=f"[bold]{label}[/] ...")
            else:
                done.append(event)
                progress.update(task, completed=1, description=f"[green]{label}[/] {escape(event.detail)}")
                progress.stop_task(task)

        started: set[Any] = set()
        result = call(show)
        for (s, t), task in tasks.items():  # e.g. the package step of a variant that failed its gates
            if task not in started:
                progress.start_task(task)
                progress.update(task, completed=1, description=f"[dim]{s} {t}".rstrip() + " (skipped)")
                progress.stop_task(task)
        return result, done


@app.command()
def inspect(
    package: Annotated[Path, typer.Argument(help="Package folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Show a package's manifest (not verified: use 'verify' before trusting it)."""
    with user_errors():
        from google.protobuf import json_format

        from slmops_builder.packaging import read_manifest

        manifest, pid = read_manifest(package)
        if as_json:
            data = json_format.MessageToDict(manifest, preserving_proto_field_name=True)
            typer.echo(json.dumps({"package_id": pid, "manifest": data}, indent=2))
            return
        head = Table(show_header=False, title=f"{manifest.name} {manifest.version} (unverified)")
        head.add_column(style="bold")
        head.add_column()
        p = manifest.profile
        rows = [
            ("package id", pid),
            ("kind", manifest.kind),
            ("security version", str(manifest.security_version)),
            ("profile", f"{p.name} ({p.execution_provider}, {p.precision}) min memory {_size(p.min_memory_bytes)}"),
            ("quantization", ", ".join(f"{k}={v}" for k, v in sorted(p.quantization.items())) or "-"),
            ("size", _size(manifest.evaluation.size_bytes)),
            ("metrics", ", ".join(f"{k}={v:.2f}" for k, v in sorted(manifest.evaluation.metrics.items())) or "-"),
            ("base model", f"{manifest.lineage.base_model} ({manifest.lineage.base_model_sha256[:16]})"),
            ("tools", ", ".join(f"{k} {v}" for k, v in sorted(manifest.lineage.tool_versions.items()))),
            ("builder", manifest.builder_version),
        ]
        for g in manifest.golden_prompts:
            rows.append(("golden prompt", f"{g.prompt!r} -> {g.reference[:60]!r}"))
        for k, v in rows:
            head.add_row(k, v)
        _out.print(head)
        files = Table(title="files")
        files.add_column("path")
        files.add_column("size", justify="right")
        files.add_column("sha256")
        for f in manifest.files:
            files.add_row(f.path, _size(f.size), f.sha256[:16])
        _out.print(files)


@app.command()
def verify(
    package: Annotated[Path, typer.Argument(help="Package folder.")],
    key: Annotated[list[Path], typer.Option("--key", "-k", help="Trusted public key file (.pub), repeatable.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check the signature and every blob's size and SHA-256. Exit 3 when the package is rejected."""
    with user_errors():
        from slmops_builder.keys import load_public_key
        from slmops_builder.packaging import verify_package

        keys = [load_public_key(k) for k in key]
        with _err.status("verifying ..."):
            verified = verify_package(package, keys)
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "ok": True,
                        "package_id": verified.package_id,
                        "key_id": verified.key_id,
                        "files": len(verified.manifest.files),
                    }
                )
            )
        else:
            _out.print(
                f"[green]ok[/]: {verified.manifest.name} {verified.manifest.version}, "
                f"package id {verified.package_id}, signed by {verified.key_id}, "
                f"{len(verified.manifest.files)} files checked"
            )


@app.command()
def profiles(as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """List the hardware profiles, and the model architectures each builds."""
    from slmops_builder.architectures import ARCHITECTURES, profile_architectures
    from slmops_builder.profiles import PROFILES

    if as_json:
        typer.echo(
            json.dumps(
                [
                    {**p.spec(), "min_memory_bytes": p.min_memory_bytes, "architectures": profile_architectures(p)}
                    for p in PROFILES.values()
                ]
            )
        )
        return
    table = Table(title="hardware profiles")
    table.add_column("name", no_wrap=True)
    for col in ("provider", "precision", "method", "engine", "options", "min memory", "architectures", "description"):
        table.add_column(col)
    for p in PROFILES.values():
        q = ", ".join(f"{k}={v}" for k, v in p.quantization.items()) or "-"
        archs = profile_architectures(p)
        builds = (
            "all listed"
            if len(archs) == len(ARCHITECTURES)
            else ", ".join(a.removesuffix("ForCausalLM") for a in archs)
        )
        row = (p.name, p.execution_provider, p.precision, p.method, p.engine, q, _size(p.min_memory_bytes), builds)
        table.add_row(*row, p.description)
    _out.print(table)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


# Training commands (task, finetune, distill, adapter-base, adapter-export): slmops_builder.train.cli.
from slmops_builder.train.cli import register as _register_training  # noqa: E402

_register_training(app)

"""`slmops fleet ...`: run the fleet manager and operate it.

Cheap to import: FastAPI, SQLAlchemy, amqtt and paho are imported inside the commands.
Commands other than `serve` find the fleet by --fleet URL + --token, by SLMOPS_FLEET_URL and
SLMOPS_FLEET_TOKEN, or by <data dir>/fleet.json (which `serve` writes).
"""

from __future__ import annotations

import json
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from slmops_fleet.client import FleetClient

app = typer.Typer(
    help="Run the fleet manager and operate it: tokens, packages, rollouts, devices.",
    no_args_is_help=True,
    add_completion=False,
)
token_app = typer.Typer(help="Enrollment tokens.", no_args_is_help=True)
package_app = typer.Typer(help="Model packages.", no_args_is_help=True)
rollout_app = typer.Typer(help="Rollouts.", no_args_is_help=True)
device_app = typer.Typer(help="Enrolled devices.", no_args_is_help=True)
release_app = typer.Typer(help="Releases: the variants of one model version.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(package_app, name="package")
app.add_typer(release_app, name="release")
app.add_typer(rollout_app, name="rollout")
app.add_typer(device_app, name="device")

FleetOpt = Annotated[
    str | None, typer.Option("--fleet", help="Fleet URL (default: SLMOPS_FLEET_URL or <data dir>/fleet.json).")
]
TokenOpt = Annotated[
    str | None, typer.Option("--token", help="Admin token (default: SLMOPS_FLEET_TOKEN or <data dir>/fleet.json).")
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", help="The fleet's data folder (default: SLMOPS_FLEET_DATA_DIR or ~/.slmops/fleet)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _stdout() -> Console:
    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)  # piped to a file or a program: do not squeeze ids into 80 columns
    return console


def _stderr() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    _stderr().print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _client(fleet: str | None, token: str | None, data_dir: Path | None) -> FleetClient:
    from slmops_fleet.client import FleetClient, FleetClientError, resolve_target

    try:
        return FleetClient.from_target(resolve_target(fleet, token, data_dir))
    except FleetClientError as exc:
        _fail(str(exc))


def _call(fleet: str | None, token: str | None, data_dir: Path | None, fn: Any) -> Any:
    from slmops_fleet.client import FleetClientError

    with _client(fleet, token, data_dir) as client:
        try:
            return fn(client)
        except FleetClientError as exc:
            _fail(str(exc))


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _size(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _ago(iso: str | None) -> str:
    if not iso:
        return "never"
    try:
        then = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    seconds = (datetime.now(timezone.utc) - then).total_seconds()
    if seconds < 90:
        return f"{max(0, int(seconds))} s ago"
    if seconds < 5400:
        return f"{int(seconds // 60)} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{int(seconds // 86400)} d ago"


def _table(title: str, *columns: str) -> Table:
    from rich.table import Table

    # a key/value table (all column names empty) shows no header row
    table = Table(title=title, title_justify="left", header_style="bold", show_header=any(columns))
    for i, c in enumerate(columns):
        table.add_column(c, no_wrap=i == 0)  # the first column is an id: never wrapped
    return table


_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")


def parse_duration(text: str) -> int:
    """'90', '90s', '30m', '1h', '2d' -> seconds."""
    m = _DURATION.match(text.lower())
    if not m:
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 30m, 1h or 2d")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


# --- serve ------------------------------------------------------------------------------------------


@app.command()
def serve(
    data_dir: DataDirOpt = None,
    host: Annotated[str | None, typer.Option("--host", help="HTTP listen address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="HTTP port; 0 picks a free one (default).")] = None,
    public_url: Annotated[str | None, typer.Option("--public-url", help="The fleet URL devices are told.")] = None,
    database_url: Annotated[
        str | None, typer.Option("--database-url", help="SQLAlchemy URL (default: sqlite in the data folder).")
    ] = None,
    broker_url: Annotated[
        str | None,
        typer.Option("--broker-url", help="External broker mqtt://user:pass@host:port (default: embedded amqtt)."),
    ] = None,
    broker_port: Annotated[
        int | None, typer.Option("--broker-port", help="Embedded broker port on 127.0.0.1; 0 picks a free one.")
    ] = None,
    broker_provisioning: Annotated[
        str | None,
        typer.Option("--broker-provisioning", help="External broker: 'dynsec' (Mosquitto dynamic security) or 'none'."),
    ] = None,
    broker_admin_url: Annotated[
        str | None, typer.Option("--broker-admin-url", help="Dynamic-security admin mqtt://user:pass@host:port.")
    ] = None,
    public_broker_host: Annotated[
        str | None, typer.Option("--public-broker-host", help="Broker host for devices.")
    ] = None,
    public_broker_port: Annotated[
        int | None, typer.Option("--public-broker-port", help="Broker port for devices.")
    ] = None,
    topic_root: Annotated[str | None, typer.Option("--topic-root", help="MQTT topic root (default slmops/v1).")] = None,
    chunk_size: Annotated[int | None, typer.Option("--chunk-size", help="Bytes per chunk, 262144..1048576.")] = None,
    broadcast_rate: Annotated[
        int | None, typer.Option("--broadcast-rate", help="Bytes/s for all chunk transfers together; 0: no limit.")
    ] = None,
    trust_key: Annotated[
        list[Path] | None,
        typer.Option("--trust-key", help="Trusted package signing public key (*.pub); repeatable."),
    ] = None,
    log_level: Annotated[str | None, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")] = None,
) -> None:
    """Run the fleet manager: HTTP API, MQTT broker (or client of an external one), database."""
    import asyncio
    import logging

    from pydantic import ValidationError

    from slmops_fleet.errors import FleetError
    from slmops_fleet.settings import FleetSettings

    given: dict[str, Any] = {
        "data_dir": data_dir,
        "http_host": host,
        "http_port": port,
        "public_url": public_url,
        "database_url": database_url,
        "broker_url": broker_url,
        "broker_port": broker_port,
        "broker_provisioning": broker_provisioning,
        "broker_admin_url": broker_admin_url,
        "public_broker_host": public_broker_host,
        "public_broker_port": public_broker_port,
        "topic_root": topic_root,
        "chunk_size": chunk_size,
        "broadcast_rate": broadcast_rate,
        "signing_keys": trust_key or None,
        "log_level": log_level,
    }
    try:
        settings = FleetSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        _fail(f"bad settings: {problems}")

    _configure_logging(settings.log_level)
    from slmops_fleet.server import FleetInfo, run_server

    def ready(info: FleetInfo) -> None:
        kind = "embedded amqtt" if info.mqtt.embedded else "external"
        lines = [
            "slmops fleet is running",
            f"  HTTP API      {info.url}",
            f"  MQTT broker   {info.mqtt.host}:{info.mqtt.port} ({kind}, topic root {info.mqtt.topic_root})",
            f"  admin token   {settings.admin_token_file}",
            f"  fleet.json    {settings.fleet_json}",
            "Stop with Ctrl+C or SIGTERM.",
        ]
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()

    try:
        asyncio.run(run_server(settings, on_ready=ready))
    except FleetError as exc:
        _fail(exc.reason)
    except KeyboardInterrupt:
        pass
    logging.getLogger(__name__).info("fleet stopped")


def _configure_logging(level: str) -> None:
    import logging

    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    quiet = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in ("amqtt", "transitions", "uvicorn.access", "uvicorn.error", "alembic", "httpx"):
        logging.getLogger(name).setLevel(max(quiet, getattr(logging, level)))


# --- tokens -----------------------------------------------------------------------------------------


@token_app.command("create")
def token_create(
    ttl: Annotated[str, typer.Option("--ttl", help="Lifetime: 90s, 30m, 1h, 2d.")] = "1h",
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a one-time enrollment token."""
    ttl_s = parse_duration(ttl)
    if ttl_s < 1:
        raise typer.BadParameter("the lifetime must be at least one second", param_hint="--ttl")
    result = _call(fleet, token, data_dir, lambda c: c.create_token(ttl_s))
    if as_json:
        _print_json(result)
    else:
        sys.stdout.write(result["token"] + "\n")
        _stderr().print(f"one-time enrollment token, valid until {result['expires_at']}", highlight=False)


# --- packages ---------------------------------------------------------------------------------------


@package_app.command("upload")
def package_upload(
    folder: Annotated[Path, typer.Argument(help="The package folder `slmops builder build` wrote.")],
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a signed package; only the blobs the fleet lacks are sent."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    if not folder.exists():
        _fail(f"package folder not found: {folder}")
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        console=_stderr(),
        transient=as_json,
    )
    task: list[Any] = []

    def on_start(blobs: int, total: int) -> None:
        if blobs:
            task.append(progress.add_task(f"uploading {blobs} blobs", total=total))

    def on_bytes(n: int) -> None:
        if task:
            progress.advance(task[0], n)

    with progress:
        result = _call(fleet, token, data_dir, lambda c: c.upload_package(folder, on_start=on_start, on_bytes=on_bytes))
    if as_json:
        _print_json(result)
        return
    skipped = result["file_count"] - result["uploaded_blobs"]
    _stdout().print(
        f"package [bold]{result['name']} {result['version']}[/] ({result['profile'] or 'no profile'})\n"
        f"  id        {result['package_id']}\n"
        f"  uploaded  {result['uploaded_blobs']} blobs, {_size(result['uploaded_bytes'])}"
        f" ({max(0, skipped)} files already on the fleet)\n"
        f"  complete  {'yes' if result['complete'] else 'no: ' + str(len(result['missing_blobs'])) + ' blobs missing'}",
        highlight=False,
    )


@package_app.command("list")
def package_list(
    fleet: FleetOpt = None, token: TokenOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """List uploaded packages."""
    packages = _call(fleet, token, data_dir, lambda c: c.list_packages())
    if as_json:
        _print_json(packages)
        return
    table = _table("packages", "id", "name", "version", "profile", "kind", "size", "complete", "uploaded")
    for p in packages:
        table.add_row(
            p["id"][:16],
            p["name"],
            p["version"],
            p["profile"],
            p["kind"],
            _size(p["size_bytes"]),
            "yes" if p["complete"] else f"{len(p['missing_blobs'])} blobs missing",
            _ago(p["created_at"]),
        )
    _stdout().print(table)


# --- rollouts ---------------------------------------------------------------------------------------


@release_app.command("create")
def release_create(
    name: Annotated[str, typer.Argument(help="Release name (the model's name).")],
    version: Annotated[str, typer.Argument(help="Release version.")],
    package: Annotated[
        list[str],
        typer.Option(
            "--package",
            help="A package of the release (id or unique prefix), repeatable: model variants, one per hardware "
            "profile, or adapter packages, one per base.",
        ),
    ],
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Group uploaded packages into release NAME@VERSION; a rollout of it gives each device the best variant it
    can run (`slmops fleet rollout explain` says which and why)."""
    ids = [p.strip() for item in package for p in item.split(",") if p.strip()]
    release = _call(fleet, token, data_dir, lambda c: c.create_release(name, version, ids))
    if as_json:
        _print_json(release)
        return
    _print_release(release)


def _print_release(release: dict[str, Any]) -> None:
    table = _table(f"release {release['ref']} ({release['id']})", "package", "kind", "profile", "provider", "needs")
    for p in release["packages"]:
        if p.get("base_package_id"):
            needs = f"base {p['base_package_id'][:12]}"
        else:
            needs = f"{_size(p['min_memory_bytes'])} memory" if p["min_memory_bytes"] else ""
        table.add_row(p["id"][:16], p["kind"], p["profile"], p["provider"], needs)
    _stdout().print(table)


@release_app.command("list")
def release_list(
    fleet: FleetOpt = None, token: TokenOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """List releases."""
    releases = _call(fleet, token, data_dir, lambda c: c.list_releases())
    if as_json:
        _print_json(releases)
        return
    table = _table("releases", "release", "id", "packages", "profiles", "created")
    for r in releases:
        profiles = ", ".join(p["profile"] or p["kind"] for p in r["packages"])
        table.add_row(r["ref"], r["id"], str(len(r["packages"])), profiles, _ago(r["created_at"]))
    _stdout().print(table)


@release_app.command("show")
def release_show(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION or a release id.")],
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One release and its packages."""
    release = _call(fleet, token, data_dir, lambda c: c.get_release(ref))
    if as_json:
        _print_json(release)
        return
    _print_release(release)


@rollout_app.command("create")
def rollout_create(
    package: Annotated[
        str | None, typer.Option("--package", help="Package id (or a unique prefix of 8+ characters).")
    ] = None,
    release: Annotated[
        str | None,
        typer.Option("--release", help="Release NAME@VERSION (or id): each device gets the variant it runs best."),
    ] = None,
    target: Annotated[
        list[str] | None,
        typer.Option("--target", help="'all', or device ids (repeat the flag or separate with commas)."),
    ] = None,
    waves: Annotated[
        str | None,
        typer.Option(
            "--waves", help="Cumulative wave sizes, counts or percents: '1,50%,100%' (default: one wave of all)."
        ),
    ] = None,
    select: Annotated[
        str | None,
        typer.Option(
            "--select", help="Only target devices matching every term: 'tag=canary,arch=x86_64,memory_bytes>=2e9'."
        ),
    ] = None,
    soak: Annotated[str, typer.Option("--soak", help="Wait after each wave before its gates: 0, 90s, 10m.")] = "0",
    wave_timeout: Annotated[
        str | None, typer.Option("--wave-timeout", help="A device not finished this long after its wave times out.")
    ] = None,
    min_success_rate: Annotated[
        float | None, typer.Option("--min-success-rate", help="Gate: committed / finished devices, 0..1.")
    ] = None,
    max_failures: Annotated[
        int | None, typer.Option("--max-failures", help="Gate: rolled back or timed out devices tolerated.")
    ] = None,
    min_devices: Annotated[
        int, typer.Option("--min-devices", help="Finished devices before the rate gates judge.")
    ] = 1,
    max_error_rate: Annotated[
        float | None, typer.Option("--max-error-rate", help="Gate: inference errors / requests (telemetry), 0..1.")
    ] = None,
    max_p95_ttft_ms: Annotated[
        float | None, typer.Option("--max-p95-ttft-ms", help="Gate: p95 time to first token (telemetry), ms.")
    ] = None,
    min_quality_score: Annotated[
        float | None,
        typer.Option(
            "--min-quality-score", help="Gate: golden prompts matching the builder's reference on the devices, 0..1."
        ),
    ] = None,
    min_health_pass_rate: Annotated[
        float | None,
        typer.Option("--min-health-pass-rate", help="Gate: devices whose TESTING passed / devices that ran it, 0..1."),
    ] = None,
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Roll a package or a release out to all devices or to a list of them, in waves with gates between them.

    A failing gate stops the rollout and gives every device it touched its previous package back."""
    if (package is None) == (release is None):
        raise typer.BadParameter("give --package ID or --release NAME@VERSION (one of them)")
    ids = [t.strip() for item in (target or ["all"]) for t in item.split(",") if t.strip()]
    chosen: str | list[str] = "all" if ids == ["all"] else ids
    if "all" in ids and len(ids) > 1:
        raise typer.BadParameter("give either 'all' or device ids", param_hint="--target")
    wave_list = [w.strip() for w in waves.split(",") if w.strip()] if waves else None
    if waves is not None and not wave_list:
        raise typer.BadParameter("give wave sizes like 1,50%,100%", param_hint="--waves")
    gates: dict[str, Any] = {
        k: v
        for k, v in {
            "min_success_rate": min_success_rate,
            "max_failures": max_failures,
            "max_error_rate": max_error_rate,
            "max_p95_ttft_ms": max_p95_ttft_ms,
            "min_quality_score": min_quality_score,
            "min_health_pass_rate": min_health_pass_rate,
        }.items()
        if v is not None
    }
    if gates:
        gates["min_devices"] = min_devices
    soak_s = parse_duration(soak)
    timeout_s = parse_duration(wave_timeout) if wave_timeout is not None else None
    rollout = _call(
        fleet,
        token,
        data_dir,
        lambda c: c.create_rollout(
            package,
            chosen,
            release=release,
            waves=wave_list,
            soak_s=soak_s if soak_s else None,
            wave_timeout_s=timeout_s,
            gates=gates or None,
            selector=select,
        ),
    )
    if as_json:
        _print_json(rollout)
        return
    from slmops_fleet.rollouts.states import TargetState

    sizes = "+".join(str(w["size"]) for w in rollout["waves"]) or "0"
    what = rollout.get("release") or f"{rollout['package_name']} {rollout['package_version']}"
    no_variant = rollout["counts"].get(TargetState.NO_VARIANT.value, 0)
    _stdout().print(
        f"rollout [bold]{rollout['id']}[/]: {what} to {len(rollout['devices']) - no_variant} devices in "
        f"{len(rollout['waves'])} waves ({sizes}) ({rollout['state']})"
        + (f"; {no_variant} devices can run no variant (see `rollout explain`)" if no_variant else ""),
        highlight=False,
    )


@rollout_app.command("explain")
def rollout_explain(
    rollout_id: Annotated[str, typer.Argument(help="Rollout id ('latest': the newest).")] = "latest",
    device: Annotated[str | None, typer.Argument(help="Only this device.")] = None,
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Which variant each device got and why, and why the others were not chosen."""
    r = _call(fleet, token, data_dir, lambda c: c.explain_rollout(rollout_id, device))
    if as_json:
        _print_json(r)
        return
    table = _table(
        f"rollout {r['rollout_id']}" + (f" of {r['release']}" if r.get("release") else ""),
        "device",
        "chosen",
        "candidate",
        "verdict",
    )
    for d in r["devices"]:
        chosen = (d["package_id"] or "")[:12] or d["state"]
        rows = d["candidates"] or [{"profile": "", "package_id": d["package_id"] or "", "why": d["reason"]}]
        for i, c in enumerate(rows):
            table.add_row(
                d["device_id"] if i == 0 else "",
                chosen if i == 0 else "",
                f"{c['profile'] or c.get('kind', '')} {c['package_id'][:12]}",
                c["why"],
            )
    _stdout().print(table)


def _control(action: str, rollout_id: str, reason: str, fleet: Any, token: Any, data_dir: Any, as_json: bool) -> None:
    r = _call(fleet, token, data_dir, lambda c: c.control_rollout(rollout_id, action, reason))
    if as_json:
        _print_json(r)
        return
    _stdout().print(f"rollout [bold]{r['id']}[/]: {r['state']}", highlight=False)


RolloutIdArg = Annotated[str, typer.Argument(help="Rollout id ('latest': the newest).")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why, for the rollout's record.")]


def _control_command(action: str, doc: str) -> None:
    def command(
        rollout_id: RolloutIdArg,
        reason: ReasonOpt = "",
        fleet: FleetOpt = None,
        token: TokenOpt = None,
        data_dir: DataDirOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        _control(action, rollout_id, reason, fleet, token, data_dir, as_json)

    command.__doc__ = doc
    rollout_app.command(action)(command)


_control_command("pause", "Hold a rollout: the running wave finishes, the next one does not start.")
_control_command("resume", "Continue a paused rollout.")
_control_command("cancel", "Stop a rollout: no further wave starts; devices already updated keep what they got.")


def _counts(counts: dict[str, int], empty: str = "none") -> str:
    return ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items())) or empty


@rollout_app.command("list")
def rollout_list(
    fleet: FleetOpt = None, token: TokenOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """List rollouts."""
    rollouts = _call(fleet, token, data_dir, lambda c: c.list_rollouts())
    if as_json:
        _print_json(rollouts)
        return
    table = _table("rollouts", "id", "package", "devices", "wave", "state", "progress", "created")
    for r in rollouts:
        waves = r.get("waves") or []
        table.add_row(
            r["id"],
            r.get("release") or f"{r['package_name']} {r['package_version']}",
            str(len(r["devices"])),
            f"{min(r.get('current_wave', 0) + 1, len(waves))}/{len(waves)}" if waves else "",
            r["state"],
            _counts(r["counts"], "no devices"),
            _ago(r["created_at"]),
        )
    _stdout().print(table)


@rollout_app.command("status")
def rollout_status(
    rollout_id: Annotated[str, typer.Argument(help="Rollout id (default: the newest).")] = "latest",
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One rollout: wave by wave, then device by device."""
    from slmops_fleet.rollouts.states import ACTIVE_ROLLOUT_STATES

    r = _call(fleet, token, data_dir, lambda c: c.get_rollout(rollout_id))
    if as_json:
        _print_json(r)
        return
    console = _stdout()
    plan = r.get("plan") or {}
    gates = {k: v for k, v in (plan.get("gates") or {}).items() if v is not None and k != "min_devices"}
    waves = _table(
        f"rollout {r['id']}: {r['state']}" + (f" ({r['reason']})" if r.get("reason") else ""),
        "wave",
        "devices",
        "state",
        "progress",
        "started",
        "completed",
    )
    for w in r.get("waves", []):
        marker = " <" if w["index"] == r.get("current_wave") and r["state"] in ACTIVE_ROLLOUT_STATES else ""
        waves.add_row(
            f"{w['index'] + 1}{marker}",
            str(w["size"]),
            w["state"],
            _counts(w["counts"]),
            _ago(w["started_at"]) if w["started_at"] else "",
            _ago(w["completed_at"]) if w["completed_at"] else "",
        )
    console.print(waves)
    console.print(
        f"plan: waves {','.join(plan.get('waves', []))}, soak {plan.get('soak_s', 0):g} s, "
        f"wave timeout {plan.get('wave_timeout_s') or 'none'}, gates "
        + (", ".join(f"{k}={v}" for k, v in gates.items()) or "none")
        + (f", select {plan['selector']}" if plan.get("selector") else ""),
        highlight=False,
    )
    what = r.get("release") or f"{r['package_name']} {r['package_version']}"
    table = _table(
        f"rollout {r['id']}: {what} ({r['state']}; {_counts(r['counts'])})",
        "device",
        "wave",
        "generation",
        "package",
        "state",
        "quality",
        "reason",
        "updated",
    )
    for d in r["devices"]:
        test = d.get("test") or {}
        quality = f"{test['matched']}/{test['judged']}" if test.get("judged") else ("tested" if test else "")
        if test and not test.get("passed"):
            quality += " failed"
        wave = d.get("wave", 0)
        table.add_row(
            d["device_id"],
            str(wave + 1) if wave >= 0 else "",
            str(d["generation"] or ""),
            (d.get("package_id") or "")[:12],
            d["state"],
            quality,
            d["reason"] or "",
            _ago(d["updated_at"]),
        )
    console.print(table)
    if r.get("transitions"):
        history = _table("history", "at", "state", "reason")
        for tr in r["transitions"][-10:]:
            history.add_row(tr["at"][11:19], tr["state"], tr["reason"])
        console.print(history)


# --- devices, status, stats -------------------------------------------------------------------------


@device_app.command("list")
def device_list(
    fleet: FleetOpt = None, token: TokenOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """List enrolled devices."""
    devices = _call(fleet, token, data_dir, lambda c: c.list_devices())
    if as_json:
        _print_json(devices)
        return
    table = _table("devices", "id", "name", "tags", "state", "active version", "progress", "last seen")
    for d in devices:
        progress = ""
        if d["bytes_needed"]:
            progress = f"{_size(d['bytes_received'])} / {_size(d['bytes_needed'])}"
        table.add_row(
            d["id"],
            d["name"] or "",
            ",".join(d.get("tags") or []),
            d["state"] or "enrolled",
            d["active_version"] or "",
            progress,
            _ago(d["last_seen"]),
        )
    _stdout().print(table)


@device_app.command("tag")
def device_tag(
    device_id: Annotated[str, typer.Argument(help="Device id.")],
    add: Annotated[list[str] | None, typer.Option("--add", help="Tag to add; repeatable or comma-separated.")] = None,
    remove: Annotated[
        list[str] | None, typer.Option("--remove", help="Tag to remove; repeatable or comma-separated.")
    ] = None,
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add or remove a device's tags (rollouts select devices by them: --select tag=canary)."""
    adds = [t.strip() for item in (add or []) for t in item.split(",") if t.strip()]
    removes = [t.strip() for item in (remove or []) for t in item.split(",") if t.strip()]
    if not adds and not removes:
        raise typer.BadParameter("give --add or --remove")
    d = _call(fleet, token, data_dir, lambda c: c.update_device_tags(device_id, adds, removes))
    if as_json:
        _print_json(d)
        return
    _stdout().print(f"{d['id']}: tags {', '.join(d['tags']) or 'none'}", highlight=False)


@app.command()
def status(
    fleet: FleetOpt = None, token: TokenOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """The fleet at a glance."""
    s = _call(fleet, token, data_dir, lambda c: c.status())
    if as_json:
        _print_json(s)
        return
    mqtt = s["mqtt"]
    t = s["transfer"]
    table = _table(f"slmops fleet {s['version']} at {s['url']}", "", "")
    rows = [
        ("uptime", f"{s['uptime_s']:.0f} s"),
        ("database", s["database"]),
        (
            "MQTT broker",
            f"{mqtt['host']}:{mqtt['port']} ({'embedded' if mqtt['embedded'] else 'external'}, "
            f"{'connected' if mqtt['connected'] else 'NOT connected'}, root {mqtt['topic_root']})",
        ),
        ("trusted keys", ", ".join(s["trusted_keys"]) or "none (uploads are refused)"),
        ("devices", f"{s['devices']} ({_counts(s['devices_by_state'])})"),
        ("packages", f"{s['packages']} ({s['blobs']} blobs, {_size(s['blob_bytes'])})"),
        ("rollouts", f"{s['rollouts']} ({_counts(s['rollouts_by_state'])})"),
        ("sent: broadcast", f"{_size(t['broadcast_bytes'])} in {t['broadcast_chunks']} chunks"),
        ("sent: repair", f"{_size(t['repair_bytes'])} in {t['repair_chunks']} chunks"),
        ("transfers running", str(len(s["active_transfers"]))),
        ("telemetry samples", str(s["telemetry_samples"])),
    ]
    for k, v in rows:
        table.add_row(k, v)
    _stdout().print(table)


@app.command()
def stats(
    fleet: FleetOpt = None, token: TokenOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """Bytes and chunks sent per blob: broadcast vs repair."""
    s = _call(fleet, token, data_dir, lambda c: c.stats())
    if as_json:
        _print_json(s)
        return
    table = _table(
        "blob transfers",
        "blob",
        "size",
        "broadcast",
        "chunks",
        "repair",
        "chunks",
        "broadcasts",
        "requests (whole/part)",
    )
    for b in s["blobs"]:
        table.add_row(
            b["sha256"][:16],
            _size(b["size"]),
            _size(b["broadcast_bytes"]),
            str(b["broadcast_chunks"]),
            _size(b["repair_bytes"]),
            str(b["repair_chunks"]),
            str(b["broadcasts"]),
            f"{b['whole_requests']}/{b['partial_requests']}",
        )
    t = s["totals"]
    table.add_section()
    table.add_row(
        "total",
        "",
        _size(t["broadcast_bytes"]),
        str(t["broadcast_chunks"]),
        _size(t["repair_bytes"]),
        str(t["repair_chunks"]),
        str(t["broadcasts"]),
        f"{t['whole_requests']}/{t['partial_requests']}",
    )
    _stdout().print(table)

"""`slmops fleet rollout ...`: create rollouts in waves with gates, explain them, control and watch them."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from slmops_fleet.cli.common import (
    DataDirOpt,
    FleetOpt,
    JsonOpt,
    TokenOpt,
    ago_text,
    call,
    counts_text,
    new_table,
    out_console,
    parse_duration,
    print_json,
)
from slmops_fleet.rollouts.states import TargetState

app = typer.Typer(help="Rollouts.", no_args_is_help=True)


@app.command("create")
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
            "--waves",
            help="Cumulative wave sizes, counts or percents, after selector waves: '1,50%,100%', "
            "'tag=canary,10%,100%' (default: one wave of all).",
        ),
    ] = None,
    select: Annotated[
        str | None,
        typer.Option(
            "--select",
            help="Only target matching devices: 'tag=canary,arch=x86_64' or "
            "'(tag=a OR group=kiosks) AND arch IN (x86_64, aarch64) AND NOT tag=lab'.",
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
    wave_list = [waves] if waves and waves.replace(",", "").strip() else None  # the fleet splits it
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
    rollout = call(
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
        print_json(rollout)
        return
    sizes = "+".join(str(w["size"]) for w in rollout["waves"]) or "0"
    what = rollout.get("release") or f"{rollout['package_name']} {rollout['package_version']}"
    no_variant = rollout["counts"].get(TargetState.NO_VARIANT.value, 0)
    out_console().print(
        f"rollout [bold]{rollout['id']}[/]: {what} to {len(rollout['devices']) - no_variant} devices in "
        f"{len(rollout['waves'])} waves ({sizes}) ({rollout['state']})"
        + (f"; {no_variant} devices can run no variant (see `rollout explain`)" if no_variant else ""),
        highlight=False,
    )


@app.command("explain")
def rollout_explain(
    rollout_id: Annotated[str, typer.Argument(help="Rollout id ('latest': the newest).")] = "latest",
    device: Annotated[str | None, typer.Argument(help="Only this device.")] = None,
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Which variant each device got and why, and why the others were not chosen."""
    r = call(fleet, token, data_dir, lambda c: c.explain_rollout(rollout_id, device))
    if as_json:
        print_json(r)
        return
    table = new_table(
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
    out_console().print(table)


def _control(action: str, rollout_id: str, reason: str, fleet: Any, token: Any, data_dir: Any, as_json: bool) -> None:
    r = call(fleet, token, data_dir, lambda c: c.control_rollout(rollout_id, action, reason))
    if as_json:
        print_json(r)
        return
    out_console().print(f"rollout [bold]{r['id']}[/]: {r['state']}", highlight=False)


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
    app.command(action)(command)


_control_command("pause", "Hold a rollout: the running wave finishes, the next one does not start.")
_control_command("resume", "Continue a paused rollout.")
_control_command("cancel", "Stop a rollout: no further wave starts; devices already updated keep what they got.")


@app.command("list")
def rollout_list(
    fleet: FleetOpt = None, token: TokenOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """List rollouts."""
    rollouts = call(fleet, token, data_dir, lambda c: c.list_rollouts())
    if as_json:
        print_json(rollouts)
        return
    table = new_table("rollouts", "id", "package", "devices", "wave", "state", "progress", "created")
    for r in rollouts:
        waves = r.get("waves") or []
        table.add_row(
            r["id"],
            (r.get("release") or f"{r['package_name']} {r['package_version']}")
            + (f" (rollback of {r['rollback_of']})" if r.get("rollback_of") else "")
            + (f" (rolled back by {', '.join(r['rolled_back_by'])})" if r.get("rolled_back_by") else ""),
            str(len(r["devices"])),
            f"{min(r.get('current_wave', 0) + 1, len(waves))}/{len(waves)}" if waves else "",
            r["state"],
            counts_text(r["counts"], "no devices"),
            ago_text(r["created_at"]),
        )
    out_console().print(table)


@app.command("status")
def rollout_status(
    rollout_id: Annotated[str, typer.Argument(help="Rollout id (default: the newest).")] = "latest",
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Redraw the tables until the rollout ends (Ctrl+C stops).")
    ] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.2, help="Seconds between redraws (--watch).")] = 1.0,
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One rollout: wave by wave, then device by device with what each has received."""
    from slmops_fleet.cli.rollout_watch import render_status
    from slmops_fleet.cli.rollout_watch import watch as watch_status

    if as_json:
        print_json(call(fleet, token, data_dir, lambda c: c.get_rollout(rollout_id)))
        return

    def fetch() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return call(fleet, token, data_dir, lambda c: (c.get_rollout(rollout_id), c.list_devices()))

    if watch:
        watch_status(fetch, interval)
    else:
        out_console().print(render_status(*fetch()))


@app.command("rollback")
def rollout_rollback(
    rollout_id: RolloutIdArg,
    fleet: FleetOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Return every device the rollout changed to the package it had before, as a new rollout with the
    same waves and gates (the rollout is cancelled first if it still runs)."""
    r = call(fleet, token, data_dir, lambda c: c.rollback_rollout(rollout_id))
    if as_json:
        print_json(r)
        return
    sizes = "+".join(str(w["size"]) for w in r["waves"]) or "0"
    out_console().print(
        f"rollout [bold]{r['id']}[/]: rollback of {r['rollback_of']}, {len(r['devices'])} devices return to their "
        f"previous package in {len(r['waves'])} waves ({sizes}) ({r['state']})",
        highlight=False,
    )

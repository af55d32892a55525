"""`slmops fleet status` and `slmops fleet stats`: the fleet at a glance, and its blob transfers."""

from __future__ import annotations

from typing import Any

from slmops_fleet.cli.common import (
    DataDirOpt,
    FleetOpt,
    JsonOpt,
    TokenOpt,
    call,
    counts_text,
    new_table,
    out_console,
    print_json,
    size_text,
)


def status(
    fleet: FleetOpt = None, token: TokenOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """The fleet at a glance."""
    s = call(fleet, token, data_dir, lambda c: c.status())
    if as_json:
        print_json(s)
        return
    mqtt = s["mqtt"]
    t = s["transfer"]
    table = new_table(f"slmops fleet {s['version']} at {s['url']}", "", "")
    rows = [
        ("uptime", f"{s['uptime_s']:.0f} s"),
        ("database", s["database"]),
        (
            "MQTT broker",
            f"{mqtt['host']}:{mqtt['port']} ({'embedded' if mqtt['embedded'] else 'external'}, "
            f"{'connected' if mqtt['connected'] else 'NOT connected'}, root {mqtt['topic_root']})",
        ),
        ("trusted keys", ", ".join(s["trusted_keys"]) or "none (uploads are refused)"),
        ("devices", f"{s['devices']} ({counts_text(s['devices_by_state'])})"),
        ("packages", f"{s['packages']} ({s['blobs']} blobs, {size_text(s['blob_bytes'])})"),
        ("rollouts", f"{s['rollouts']} ({counts_text(s['rollouts_by_state'])})"),
        ("sent: broadcast", f"{size_text(t['broadcast_bytes'])} in {t['broadcast_chunks']} chunks"),
        ("sent: repair", f"{size_text(t['repair_bytes'])} in {t['repair_chunks']} chunks"),
        ("transfers running", str(len(s["active_transfers"]))),
        ("telemetry samples", str(s["telemetry_samples"])),
    ]
    for k, v in rows:
        table.add_row(k, v)
    limits = s.get("limits") or {}
    if limits:
        table.add_section()
        for k, v in _limit_rows(limits):
            table.add_row(k, v)
    out_console().print(table)


_LIMIT_LABELS = {
    "mqtt_oversized_packets": "refused: MQTT packets over the size limit",
    "mqtt_wills_refused": "refused: wills outside a device's ACL",
    "mqtt_retained_device_messages_cleared": "cleared: retained messages on device topics",
    "blob_requests_rate_limited": "dropped: blob requests over the rate",
    "blob_requests_refused_chunk_size": "refused: blob requests in another chunk size",
    "blob_requests_resized": "resized: whole-blob requests in another chunk size",
    "telemetry_batches_refused": "refused: telemetry batches over the sample limit",
    "messages_malformed": "dropped: malformed messages",
    "messages_unknown_device": "dropped: messages from unknown devices",
    "messages_dropped_queue_full": "dropped: messages past a full ingest queue",
}


def _limit_rows(limits: dict[str, Any]) -> list[tuple[str, str]]:
    """What devices had refused or dropped since the fleet started, and telemetry retention."""
    rows = [
        (label, "n/a (external broker: see its log)" if limits.get(key) is None else str(limits[key]))
        for key, label in _LIMIT_LABELS.items()
        if key in limits
    ]
    r = limits.get("retention") or {}
    if r:
        bounds = [f"{r['max_age_s'] / 86400:g} days" if r["max_age_s"] else "", f"{r['max_rows_per_device']} rows"]
        bounds = [b for b in bounds if b and not b.startswith("0 rows")]
        when = f", last sweep {r['last_sweep_s']} s" if r.get("last_sweep_s") is not None else ""
        rows.append(
            (
                "telemetry retention",
                f"{r['dropped_rows']} samples dropped in {r['sweeps']} sweeps{when} "
                f"(bound: {' or '.join(bounds) or 'none'} per device)",
            )
        )
    return rows


def stats(
    fleet: FleetOpt = None, token: TokenOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """Bytes and chunks sent per blob: broadcast vs repair."""
    s = call(fleet, token, data_dir, lambda c: c.stats())
    if as_json:
        print_json(s)
        return
    table = new_table(
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
            size_text(b["size"]),
            size_text(b["broadcast_bytes"]),
            str(b["broadcast_chunks"]),
            size_text(b["repair_bytes"]),
            str(b["repair_chunks"]),
            str(b["broadcasts"]),
            f"{b['whole_requests']}/{b['partial_requests']}",
        )
    t = s["totals"]
    table.add_section()
    table.add_row(
        "total",
        "",
        size_text(t["broadcast_bytes"]),
        str(t["broadcast_chunks"]),
        size_text(t["repair_bytes"]),
        str(t["repair_chunks"]),
        str(t["broadcasts"]),
        f"{t['whole_requests']}/{t['partial_requests']}",
    )
    out_console().print(table)

"""`slmops fleet rollout status [--watch]`: one rollout wave by wave, then device by device with what
each device has received of its package (bytes received / bytes it had to fetch, as the device
reports them), its quality test, its reason; `--watch` redraws it every interval until the rollout
ends or Ctrl+C."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text

from slmops_fleet.cli.common import ago_text, counts_text, new_table
from slmops_fleet.rollouts.states import ACTIVE_ROLLOUT_STATES


def received_text(target: dict[str, Any], device: dict[str, Any] | None) -> str:
    """What the device has received for this target: `12.3/90.0 MB`, `nothing to fetch` (every blob
    was already on the device), or empty while the device has not reported on the target yet."""
    if device is None or not target.get("generation") or device.get("reported_generation") != target["generation"]:
        return ""
    needed = int(device.get("bytes_needed") or 0)
    received = int(device.get("bytes_received") or 0)
    if needed <= 0:
        return "" if device.get("state") == "FETCHING" else "nothing to fetch"
    return f"{received / 1e6:.1f}/{needed / 1e6:.1f} MB"


def _quality(test: dict[str, Any]) -> str:
    quality = f"{test['matched']}/{test['judged']}" if test.get("judged") else ("tested" if test else "")
    return quality + (" failed" if test and not test.get("passed") else "")


def render_status(r: dict[str, Any], devices: list[dict[str, Any]]) -> RenderableType:
    """The rollout `r` (the API's JSON) with the devices' own reports (`device list`'s JSON)."""
    plan = r.get("plan") or {}
    gates = {k: v for k, v in (plan.get("gates") or {}).items() if v is not None and k != "min_devices"}
    links = ""
    if r.get("rollback_of"):
        links += f"; rollback of {r['rollback_of']}"
    if r.get("rolled_back_by"):
        links += f"; rolled back by {', '.join(r['rolled_back_by'])}"
    waves = new_table(
        f"rollout {r['id']}: {r['state']}" + (f" ({r['reason']})" if r.get("reason") else "") + links,
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
            counts_text(w["counts"]),
            ago_text(w["started_at"]) if w["started_at"] else "",
            ago_text(w["completed_at"]) if w["completed_at"] else "",
        )
    plan_line = Text(
        f"plan: waves {','.join(plan.get('waves', []))}, soak {plan.get('soak_s', 0):g} s, "
        f"wave timeout {plan.get('wave_timeout_s') or 'none'}, gates "
        + (", ".join(f"{k}={v}" for k, v in gates.items()) or "none")
        + (f", select {plan['selector']}" if plan.get("selector") else "")
    )
    what = r.get("release") or f"{r['package_name']} {r['package_version']}"
    table = new_table(
        f"rollout {r['id']}: {what} ({r['state']}; {counts_text(r['counts'])})",
        "device",
        "wave",
        "generation",
        "package",
        "state",
        "received",
        "quality",
        "reason",
        "updated",
    )
    by_id = {d["id"]: d for d in devices}
    for d in r["devices"]:
        wave = d.get("wave", 0)
        table.add_row(
            d["device_id"],
            str(wave + 1) if wave >= 0 else "",
            str(d["generation"] or ""),
            (d.get("package_id") or "")[:12],
            d["state"],
            received_text(d, by_id.get(d["device_id"])),
            _quality(d.get("test") or {}),
            d["reason"] or "",
            ago_text(d["updated_at"]),
        )
    parts: list[RenderableType] = [waves, plan_line, table]
    if r.get("transitions"):
        history = new_table("history", "at", "state", "reason")
        for tr in r["transitions"][-10:]:
            history.add_row(tr["at"][11:19], tr["state"], tr["reason"])
        parts.append(history)
    return Group(*parts)


def watch(fetch: Callable[[], tuple[dict[str, Any], list[dict[str, Any]]]], interval: float) -> dict[str, Any]:
    """Redraw the status every `interval` seconds until the rollout is no longer active (or Ctrl+C);
    returns the last rollout read."""
    from rich.live import Live

    from slmops_fleet.cli.common import out_console

    r, devices = fetch()
    with Live(render_status(r, devices), console=out_console(), refresh_per_second=4) as live:
        try:
            while r["state"] in ACTIVE_ROLLOUT_STATES:
                time.sleep(interval)
                r, devices = fetch()
                live.update(render_status(r, devices))
        except KeyboardInterrupt:
            pass
    return r

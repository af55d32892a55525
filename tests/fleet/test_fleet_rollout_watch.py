"""What `rollout status` shows each device received, from the device's own report (the drawing of a
running rollout; the e2e rollback test runs `--watch` against real agents)."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from slmops_fleet.cli.rollout_watch import received_text, render_status


def _target(device_id: str, state: str, generation: int = 2) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "generation": generation,
        "state": state,
        "wave": 0,
        "package_id": "b" * 64,
        "reason": None,
        "test": None,
        "updated_at": "2026-12-07T09:00:00+00:00",
    }


def _device(device_id: str, state: str, generation: int, needed: int, received: int) -> dict[str, Any]:
    return {
        "id": device_id,
        "state": state,
        "reported_generation": generation,
        "bytes_needed": needed,
        "bytes_received": received,
    }


def test_received_follows_the_devices_report_for_this_target() -> None:
    assert received_text(_target("a", "FETCHING"), _device("a", "FETCHING", 2, 90_000_000, 45_000_000)) == (
        "45.0/90.0 MB"
    )
    # committed: what it fetched stays in its report
    assert received_text(_target("a", "COMMITTED"), _device("a", "COMMITTED", 2, 90_000_000, 90_000_000)) == (
        "90.0/90.0 MB"
    )
    # every blob was already there (the package in its other slot)
    assert received_text(_target("a", "COMMITTED"), _device("a", "COMMITTED", 2, 0, 0)) == "nothing to fetch"
    # a report about an older generation, or none yet, says nothing about this target
    assert received_text(_target("a", "PENDING"), _device("a", "COMMITTED", 1, 90_000_000, 90_000_000)) == ""
    assert received_text(_target("a", "WAITING", generation=0), None) == ""
    assert received_text(_target("a", "FETCHING"), _device("a", "FETCHING", 2, 0, 0)) == ""


def test_status_draws_the_waves_devices_and_links() -> None:
    rollout = {
        "id": "ro-2",
        "state": "in_progress",
        "reason": None,
        "rollback_of": "ro-1",
        "rolled_back_by": [],
        "plan": {"waves": ["100%"], "soak_s": 0, "gates": {}},
        "current_wave": 0,
        "waves": [
            {
                "index": 0,
                "size": 2,
                "state": "running",
                "counts": {"FETCHING": 1, "COMMITTED": 1},
                "started_at": None,
                "completed_at": None,
            }
        ],
        "release": None,
        "package_name": "m",
        "package_version": "1.0.0",
        "counts": {"FETCHING": 1, "COMMITTED": 1},
        "devices": [_target("a", "FETCHING"), _target("b", "COMMITTED")],
        "transitions": [],
    }
    devices = [_device("a", "FETCHING", 2, 2_000_000, 500_000), _device("b", "COMMITTED", 2, 0, 0)]
    console = Console(width=200, record=True)
    console.print(render_status(rollout, devices))
    text = console.export_text()
    assert "rollback of ro-1" in text and "received" in text
    assert "0.5/2.0 MB" in text and "nothing to fetch" in text

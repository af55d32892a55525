"""`slmops fleet group ...` against `slmops fleet serve` as a real subprocess: groups, an assignment
that reaches a device tagged into the group later, and the one-line errors of bad input."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_fleet_cli import fail, served

from slmops_cli.procs import run, run_json
from slmops_testing.packages import random_bytes

__all__ = ["served"]  # the fixture, imported for pytest


def test_groups_with_the_cli(served: Any, fleet_package: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    _svc, data, info = served
    d = ["--data-dir", str(data)]
    up = run_json(
        ["fleet", "package", "upload", str(fleet_package({"model.onnx": random_bytes(5000, 7)})), "--json", *d]
    )
    token = run(["fleet", "token", "create", *d]).strip()
    r = httpx.post(info["url"] + "/v1/enroll", json={"token": token, "public_key": "12" * 32, "name": "pi-1"})
    assert r.status_code == 200, r.text
    device_id = r.json()["device_id"]

    created = run_json(["fleet", "group", "create", "kiosks", "--select", "tag=kiosk OR name=pi-9", "--json", *d])
    assert created["kind"] == "dynamic" and created["members"] == []
    static = run_json(["fleet", "group", "create", "pinned", "--devices", device_id, "--json", *d])
    assert static["kind"] == "static" and static["members"] == [device_id]
    out = run_json(
        ["fleet", "group", "assign", "kiosks", "--package", up["package_id"], "--gate", "max_failures=0", "--json", *d]
    )
    assert out["rollout"] is None and out["group"]["assignment"]["plan"]["gates"]["max_failures"] == 0

    tagged = run(["fleet", "device", "tag", device_id, "--add", "kiosk", *d])  # joins the group: gets its package
    assert "groups kiosks (follows its release), pinned" in " ".join(tagged.split())
    deadline = time.monotonic() + 20
    while run_json(["fleet", "device", "list", "--json", *d])[0]["desired_package_id"] != up["package_id"]:
        assert time.monotonic() < deadline, "the device tagged into the group never got its package"
        time.sleep(0.2)
    shown = run_json(["fleet", "group", "show", "kiosks", "--json", *d])
    assert shown["members"] == [device_id] and shown["assignment"]["following"] == [device_id]
    (rollout,) = run_json(["fleet", "rollout", "list", "--json", *d])
    assert [x["device_id"] for x in rollout["devices"]] == [device_id]
    assert rollout["plan"]["gates"]["max_failures"] == 0  # the assignment's plan
    (listed,) = run_json(["fleet", "device", "list", "--json", *d])
    assert (listed["groups"], listed["follows_group"]) == (["kiosks", "pinned"], "kiosks")
    assert "kiosks*,pinned" in run(["fleet", "device", "list", *d])  # * : the group it follows
    table = run(["fleet", "group", "list", *d])
    assert "kiosks" in table and "pinned" in table and "tag=kiosk OR name=pi-9" in table
    assert device_id in run(["fleet", "group", "show", "kiosks", *d])

    # Bad input: one line naming the column; nothing kept.
    assert "column 13: expected a term" in fail(["fleet", "group", "create", "bad", "--select", "tag=kiosk OR", *d])
    assert "column 1: unknown key 'colour'" in fail(["fleet", "group", "create", "bad", "--select", "colour=red", *d])
    assert "column 12: unknown group 'nope'" in fail(
        ["fleet", "rollout", "create", "--package", up["package_id"], "--select", "tag=a, NOT group=nope", *d]
    )
    assert "unknown group 'nope'" in fail(["fleet", "group", "show", "nope", *d])
    assert "unassign it first" in fail(["fleet", "group", "delete", "kiosks", *d])
    assert "exists" in fail(["fleet", "group", "create", "pinned", "--devices", device_id, *d])
    run(["fleet", "group", "unassign", "kiosks", *d])
    run(["fleet", "group", "delete", "kiosks", *d])
    assert [g["name"] for g in run_json(["fleet", "group", "list", "--json", *d])] == ["pinned"]

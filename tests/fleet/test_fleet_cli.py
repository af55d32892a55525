"""`slmops fleet serve` as a real subprocess, driven by the `slmops fleet ...` CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops_cli.procs import Service, run, run_json, slmops_cmd
from slmops_testing.packages import random_bytes


def fail(args: list[str], env: dict[str, str] | None = None) -> str:
    """Run a CLI command that must fail cleanly; return its stderr."""
    proc = subprocess.run(
        slmops_cmd(*args),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 1, (args, proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    return " ".join(proc.stderr.split())


@pytest.fixture
def served(tmp_path: Path, signing_key: tuple[Path, Path]) -> Any:
    data = tmp_path / "fleet-data"
    svc = Service(
        "fleet",
        ["fleet", "serve", "--data-dir", str(data), "--trust-key", str(signing_key[1]), "--chunk-size", "262144"],
        tmp_path / "fleet.log",
    )
    info_path = data / "fleet.json"

    def ready() -> dict[str, Any] | None:
        try:
            return dict(json.loads(info_path.read_text()))
        except (OSError, ValueError):
            return None

    try:
        info = svc.wait_for(ready, timeout=60, what="fleet.json")
        yield svc, data, info
    finally:
        svc.stop()


def test_serve_and_operate_with_the_cli(
    served: Any, fleet_package: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # tables wide enough that rich wraps no cell, whatever the terminal
    svc, data, info = served
    d = ["--data-dir", str(data)]
    assert info["url"].startswith("http://127.0.0.1:") and info["mqtt"]["embedded"] is True
    assert info["admin_token"] == (data / "admin-token").read_text().strip()
    assert (data / "fleet.json").stat().st_mode & 0o777 == 0o600
    assert (data / "admin-token").stat().st_mode & 0o777 == 0o600

    token = run(["fleet", "token", "create", *d]).strip()
    token_json = run_json(["fleet", "token", "create", "--ttl", "10m", "--json", *d])
    assert token and token_json["ttl_s"] == 600

    pkg = fleet_package({"model.onnx": random_bytes(700_000, 5), "genai_config.json": b"{}", "tokenizer.json": b"[]"})
    up = run_json(["fleet", "package", "upload", str(pkg), "--json", *d])
    assert up["uploaded_blobs"] == 3 and up["complete"] is True and up["created"] is True
    again = run_json(["fleet", "package", "upload", str(pkg), "--json", *d])
    assert again["uploaded_blobs"] == 0 and again["created"] is False
    (listed,) = run_json(["fleet", "package", "list", "--json", *d])
    assert listed["id"] == up["package_id"]

    r = httpx.post(info["url"] + "/v1/enroll", json={"token": token, "public_key": "12" * 32, "name": "pi-1"})
    assert r.status_code == 200, r.text
    device_id = r.json()["device_id"]
    (dev,) = run_json(["fleet", "device", "list", "--json", *d])
    assert dev["id"] == device_id and dev["name"] == "pi-1"

    rollout = run_json(
        ["fleet", "rollout", "create", "--package", up["package_id"][:12], "--target", "all", "--json", *d]
    )
    assert rollout["state"] == "in_progress" and [x["device_id"] for x in rollout["devices"]] == [device_id]
    assert [x["id"] for x in run_json(["fleet", "rollout", "list", "--json", *d])] == [rollout["id"]]
    assert run_json(["fleet", "rollout", "status", "--json", *d])["id"] == rollout["id"]
    assert run_json(["fleet", "rollout", "status", rollout["id"], "--json", *d])["devices"][0]["state"] == "PENDING"
    status = run_json(["fleet", "status", "--json", *d])
    assert status["devices"] == 1 and status["packages"] == 1 and status["mqtt"]["connected"] is True
    assert "totals" in run_json(["fleet", "stats", "--json", *d])

    # Tables for people.
    assert device_id in run(["fleet", "device", "list", *d])
    assert "embedded" in run(["fleet", "status", *d])
    assert "fleet-test" in run(["fleet", "package", "list", *d])
    assert rollout["id"] in run(["fleet", "rollout", "list", *d])
    assert "total" in run(["fleet", "stats", *d])

    # Waves and gates, pause, resume, cancel.
    waved = run_json(
        [
            "fleet", "rollout", "create", "--package", up["package_id"], "--waves", "1,100%", "--soak", "1m",
            "--wave-timeout", "10m", "--max-failures", "0", "--min-success-rate", "0.9", "--json", *d,
        ]
    )  # fmt: skip
    assert waved["plan"]["soak_s"] == 60 and waved["plan"]["wave_timeout_s"] == 600
    assert waved["plan"]["gates"]["max_failures"] == 0 and waved["plan"]["gates"]["min_success_rate"] == 0.9
    assert [w["size"] for w in waved["waves"]] == [1]  # one device: the second wave adds nobody
    assert run_json(["fleet", "rollout", "pause", waved["id"], "--reason", "hold", "--json", *d])["state"] == "paused"
    table = run(["fleet", "rollout", "status", waved["id"], *d])
    assert "wave" in table and "paused" in table and "max_failures=0" in table and "hold" in table
    assert run_json(["fleet", "rollout", "resume", waved["id"], "--json", *d])["state"] == "in_progress"
    assert run_json(["fleet", "rollout", "cancel", "latest", "--json", *d])["state"] == "cancelled"
    tagged = run_json(["fleet", "device", "tag", device_id, "--add", "canary,lab", "--json", *d])
    assert tagged["tags"] == ["canary", "lab"]
    assert "canary" in run(["fleet", "device", "tag", device_id, "--remove", "lab", *d])
    assert "canary" in run(["fleet", "device", "list", *d])
    sel = run_json(
        ["fleet", "rollout", "create", "--package", up["package_id"], "--select", "tag=canary", "--json", *d]
    )
    assert [x["device_id"] for x in sel["devices"]] == [device_id] and sel["plan"]["selector"] == "tag=canary"
    assert "matches none" in fail(
        ["fleet", "rollout", "create", "--package", up["package_id"], "--select", "tag=x", *d]
    )
    assert "only a rollout that is" in fail(["fleet", "rollout", "pause", waved["id"], *d])
    assert "neither a device count" in fail(
        ["fleet", "rollout", "create", "--package", up["package_id"], "--waves", "1,half", *d]
    )
    assert len(run_json(["fleet", "rollout", "list", "--json", *d])) == 3  # the refused ones created nothing

    # The environment instead of fleet.json.
    env = {"SLMOPS_FLEET_URL": info["url"], "SLMOPS_FLEET_TOKEN": info["admin_token"]}
    nowhere = ["--data-dir", str(tmp_path / "nowhere")]
    assert run_json(["fleet", "status", "--json", *nowhere], env=env)["url"] == info["url"]

    # Clear errors, no tracebacks.
    assert "refused the admin token" in fail(["fleet", "status", "--token", "wrong", *d])
    assert "package folder not found" in fail(["fleet", "package", "upload", str(tmp_path / "missing"), *d])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "is not a package folder" in fail(["fleet", "package", "upload", str(empty), *d])
    assert "unknown package id" in fail(["fleet", "rollout", "create", "--package", "f" * 64, *d])
    assert "unknown rollout id" in fail(["fleet", "rollout", "status", "ro-nope", *d])
    assert "no running fleet found" in fail(["fleet", "status", *nowhere])

    # SIGTERM stops it cleanly and removes fleet.json; then the CLI says the fleet is not running.
    assert svc.stop() == 0
    assert not (data / "fleet.json").exists()
    assert "not running" in fail(["fleet", "status", "--fleet", info["url"], "--token", "x"])
    assert "no running fleet found" in fail(["fleet", "status", *d])


def test_serve_refuses_a_taken_broker_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        err = fail(["fleet", "serve", "--data-dir", str(tmp_path / "d"), "--broker-port", str(port)])
        assert f"port {port}" in err and "--broker-port" in err
        err = fail(["fleet", "serve", "--data-dir", str(tmp_path / "d"), "--port", str(port)])
        assert f"port {port}" in err and "--port" in err
    assert "chunk_size" in fail(["fleet", "serve", "--data-dir", str(tmp_path / "d"), "--chunk-size", "1000"])

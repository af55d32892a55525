"""How long the web console takes to show a large fleet's devices table (run by hand).

A real fleet (`slmops fleet serve`, its own process, the embedded broker), N devices enrolled over
its HTTP API and run as simulated devices (fleet_bench's `Workers`: slmops_testing/swarm.py, real
MQTT) that each send telemetry, then Debian's chromium (Playwright, headless) signs in with a
read-only token and opens /ui/devices. Measured, `--rounds` times in a fresh page each: seconds from
the navigation until the table holds all N rows (the page's first poll: GET /v1/devices and
/v1/telemetry/latest, and the table drawn); then the same two API reads alone over HTTP, to show
how much of it is the fleet and how much the browser.

    python benchmarks/console_bench.py --devices 1000
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from fleet_bench import Fleet, Workers, log

from slmops_builder.keys import generate_key, public_path
from slmops_cli.procs import wait_until

CHROMIUM = "/usr/bin/chromium"


def measure(n: int, rounds: int, workdir: Path, shots: Path | None) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    key = workdir / "keys" / "bench.key"
    generate_key(key)
    fleet = Fleet(workdir, public_path(key), None, None)
    workers: Workers | None = None
    try:
        t = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            creds = list(pool.map(fleet.enroll, [f"sim-{i}" for i in range(n)]))
        log(f"N={n}: enrolled in {time.monotonic() - t:.1f} s")
        workers = Workers(creds, 5.0)
        wait_until(lambda: workers.drain() is not None and workers.count("connected") >= n, timeout=300,
                   what=f"{n} devices connected", interval=0)  # fmt: skip
        workers.send("telemetry", 1, 10)
        wait_until(lambda: fleet.telemetry_rows() >= n * 10, timeout=300, what="telemetry stored", interval=0.2)
        url = fleet.info["url"]
        token = fleet.client.create_admin_token("bench-viewer", "read-only")["token"]
        page_s: list[float] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            page = context.new_page()
            page.goto(url + "/ui/login")
            page.fill("#token", token)
            page.click("button[type=submit]")
            page.wait_for_url("**/ui/devices")
            for _ in range(rounds):
                fresh = context.new_page()
                t0 = time.monotonic()
                fresh.goto(url + "/ui/devices")
                fresh.wait_for_selector(f'#app[data-devices="{n}"]', timeout=120_000)
                page_s.append(time.monotonic() - t0)
                if shots is not None:
                    fresh.screenshot(path=str(shots / f"devices-{n}.png"))
                fresh.close()
            browser.close()
        api_s: list[float] = []
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as client:
            for _ in range(rounds):
                t0 = time.monotonic()
                assert len(client.get("/v1/devices").json()["devices"]) == n
                client.get("/v1/telemetry/latest").raise_for_status()
                api_s.append(time.monotonic() - t0)
        result = {
            "devices": n,
            "page_to_full_table_s": round(statistics.median(page_s), 3),
            "page_s_each": [round(s, 3) for s in page_s],
            "api_reads_s": round(statistics.median(api_s), 3),
        }
        log(f"N={n}: {result}")
        return result
    finally:
        if workers is not None:
            workers.stop()
        fleet.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000, help="Simulated devices.")
    p.add_argument("--rounds", type=int, default=5, help="Page loads measured (the median is reported).")
    p.add_argument("--screenshots", type=Path, help="Save a screenshot of the full table here.")
    p.add_argument("--json", type=Path, help="Write the result as JSON to this path.")
    args = p.parse_args(argv)
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="console-bench-") as tmp:
        result = measure(args.devices, args.rounds, Path(tmp), args.screenshots)
    print(
        f"{result['devices']} devices: the console shows the full table {result['page_to_full_table_s']:.2f} s "
        f"after navigation (median of {args.rounds}); the API reads behind it take {result['api_reads_s']:.2f} s"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

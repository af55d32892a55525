"""The web console in a real headless browser: Debian's chromium (/usr/bin/chromium, installed by
.ci/run) driven by Playwright, on a running fleet (FleetThread: uvicorn, the embedded broker,
SQLite, the rollout driver) whose simulated devices send telemetry over real MQTT.

Screenshots (PNG) of the devices page, a device page (and one following its group's release), a
running rollout, a release, the groups and the fleet's plots are saved under the test's tmp folder
and, with SLMOPS_SCREENSHOTS=DIR, in DIR too:

    SLMOPS_SCREENSHOTS=/tmp/console-shots .venv/bin/python -m pytest tests/fleet/test_fleet_console_browser.py
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from slmops_testing.console_fleet import ConsoleFleet
from slmops_testing.fleet_api import enroll, new_token

CHROMIUM = os.environ.get("SLMOPS_CHROMIUM", "/usr/bin/chromium")
TOKENS_COLOR = (0x2A, 0x7A, 0xE2)  # the tokens/s plot's stroke (static/console.js)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no chromium at {CHROMIUM}: apt-get install chromium (.ci/run does), or set SLMOPS_CHROMIUM")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is missing: pip install -e '.[dev]'")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


class Watched:
    """A browser page whose console errors, uncaught exceptions and request URLs are kept."""

    def __init__(self, browser: Any, shots: Path) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 900})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.urls: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: self.urls.append(r.url))
        self.shots = shots

    def screenshot(self, name: str) -> Path:
        path = self.shots / name
        self.page.screenshot(path=str(path), full_page=True)
        extra = os.environ.get("SLMOPS_SCREENSHOTS")
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(extra) / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return path

    def sign_in(self, base: str, token: str) -> None:
        self.page.goto(base + "/ui/devices")
        assert self.page.url.endswith("/ui/login"), self.page.url  # no session: the sign-in page
        self.page.fill("#token", token)
        self.page.click("button[type=submit]")

    def hides(self, token: str) -> None:
        assert token not in self.page.content()
        assert token not in self.page.url
        assert not [u for u in self.urls if token in u]
        for cookie in self.context.cookies():
            assert token not in cookie["value"]

    def close(self) -> None:
        self.context.close()


def _until(page: Any, expression: str, timeout: float = 15) -> None:
    """Poll a JavaScript expression from here until it is true (Playwright's wait_for_function polls
    with eval inside the page, which the console's Content-Security-Policy rightly forbids)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"not true after {timeout} s: {expression}"
        time.sleep(0.1)


def _stroke_pixels(page: Any, metric: str, rgb: tuple[int, int, int]) -> int:
    """Pixels of a plot's canvas within a small distance of its series' stroke colour."""
    return int(
        page.evaluate(
            """([metric, rgb]) => {
                const c = document.querySelector(`.plot[data-metric="${metric}"] canvas`);
                const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
                let n = 0;
                for (let i = 0; i < d.length; i += 4) {
                    const dist = Math.abs(d[i] - rgb[0]) + Math.abs(d[i + 1] - rgb[1]) + Math.abs(d[i + 2] - rgb[2]);
                    if (d[i + 3] > 200 && dist < 40) n++;
                }
                return n;
            }""",
            [metric, list(rgb)],
        )
    )


def test_console_shows_a_running_fleet(browser: Any, console_fleet: ConsoleFleet, tmp_path: Path) -> None:
    fleet = console_fleet
    base = fleet.thread.url
    token = fleet.read_only_token()
    w = Watched(browser, tmp_path)
    try:
        w.sign_in(base, token)
        page = w.page
        page.wait_for_url("**/ui/devices")
        page.wait_for_selector('#app[data-devices="3"]', timeout=15_000)
        rows = page.locator("table.devices tbody tr")
        assert rows.count() == 3
        text = page.inner_text("table.devices")
        assert "edge-0" in text and "canary" in text and "tokens/s" in text
        # the groups column shows each device's named groups (not its tags)
        groups = {
            page.locator(f"table.devices tbody tr:nth-child({i}) td:nth-child(1)").inner_text(): page.locator(
                f"table.devices tbody tr:nth-child({i}) td:nth-child(4)"
            ).inner_text()
            for i in (1, 2, 3)
        }
        assert groups == {"edge-0": "canaries", "edge-1": "lab", "edge-2": "lab"}
        # every device sent telemetry: its memory and tokens/s show
        assert page.locator("table.devices tbody tr td:nth-child(8)").first.inner_text().strip() != ""
        w.screenshot("devices.png")
        w.hides(token)

        page.click("text=edge-0")
        page.wait_for_url("**/ui/devices/*")
        _until(page, "Number(document.getElementById('app').dataset.points || 0) >= 10")
        assert _stroke_pixels(page, "tokens_per_s", TOKENS_COLOR) > 50, "the tokens/s plot has no line drawn"
        assert page.locator(".plot canvas").count() == 6
        w.screenshot("device.png")
        w.hides(token)

        rollout = fleet.start_rollout()
        page.goto(f"{base}/ui/rollouts/{rollout['id']}")
        app = page.locator("#app")
        page.wait_for_selector('#app[data-state="in_progress"][data-committed="0"]', timeout=15_000)
        fleet.commit(rollout["id"], wave=0)  # the canary wave's device commits: the page follows
        page.wait_for_selector('#app[data-committed="1"]', timeout=15_000)
        deadline = time.monotonic() + 15
        while fleet.rollout(rollout["id"])["waves"][1]["state"] != "running":
            assert time.monotonic() < deadline, "wave 2 did not start"
            time.sleep(0.1)
        _until(page, "document.querySelector('table.waves tbody tr:nth-child(2)').innerText.includes('running')")
        assert "passed" in page.inner_text("table.waves tbody tr:nth-child(1)")
        w.screenshot("rollout.png")
        fleet.commit(rollout["id"], wave=1)
        page.wait_for_selector('#app[data-state="succeeded"][data-committed="3"]', timeout=15_000)
        assert app.get_attribute("data-committed") == "3"
        w.hides(token)

        page.goto(f"{base}/ui/rollouts")
        page.wait_for_selector(f"a[href='/ui/rollouts/{rollout['id']}']", timeout=15_000)
        assert "succeeded" in page.inner_text("#rollouts") and "3/3" in page.inner_text("#rollouts")

        # the release assigned to "lab": its devices follow it, the device and groups pages say so
        r = fleet.admin.post("/v1/groups/lab/assign", json={"release": "console-demo@1.0.0"})
        assert r.status_code == 200, r.text
        page.goto(f"{base}/ui/devices/{fleet.devices[1].device_id}")
        page.wait_for_selector("table.info a.follows", timeout=15_000)
        assert page.inner_text("table.info a.follows") == "lab"
        assert "the release assigned to lab" in page.inner_text("table.info")
        w.screenshot("device-following.png")
        page.goto(f"{base}/ui/groups")
        page.wait_for_selector('#app[data-groups="3"]', timeout=15_000)
        rows = {
            cells[0]: cells
            for cells in (page.locator(f"table.groups tbody tr:nth-child({i}) td").all_inner_texts() for i in (1, 2, 3))
        }
        assert rows["canaries"][1:4] == ["dynamic", "tag=canary", "1"]
        assert rows["lab"][1:4] == ["static", "2 listed", "2"]
        assert rows["lab"][5:8] == ["console-demo@1.0.0", "2", "applying"]
        assert rows["kiosks"][3:6] == ["0", "5", "none"]
        w.screenshot("groups.png")
        w.hides(token)

        # a hostile device's name is shown as text, never run
        hostile = '<img src=x onerror="window.pwned=1"><script>window.pwned=1</script>'
        assert enroll(fleet.thread, new_token(fleet.admin), name=hostile).status_code == 200
        page.goto(f"{base}/ui/devices")
        page.wait_for_selector('#app[data-devices="4"]', timeout=15_000)
        assert hostile in page.inner_text("table.devices")
        assert page.locator("table.devices img, table.devices script").count() == 0
        assert page.evaluate("window.pwned === undefined")

        page.goto(f"{base}/ui/releases/{fleet.release['id']}")
        page.wait_for_selector("text=HuggingFaceTB/SmolLM2-135M-Instruct", timeout=15_000)
        assert "perplexity 12.5" in page.inner_text("#lineage")
        w.screenshot("release.png")
        page.goto(f"{base}/ui/fleet")
        _until(page, "Number(document.getElementById('app').dataset.points || 0) >= 1")
        w.screenshot("fleet.png")
        w.hides(token)
        assert w.errors == []
    finally:
        w.close()


def test_console_refuses_a_wrong_token(browser: Any, console_fleet: ConsoleFleet, tmp_path: Path) -> None:
    base = console_fleet.thread.url
    wrong = "not-a-token-" + "x" * 30
    w = Watched(browser, tmp_path)
    try:
        w.sign_in(base, wrong)
        page = w.page
        page.wait_for_selector(".error")
        assert "Wrong, revoked or malformed token" in page.inner_text(".error")
        assert page.url == base + "/ui/login"
        assert w.context.cookies() == []
        w.hides(wrong)
        page.goto(base + "/ui/rollouts")  # still no session
        assert page.url.endswith("/ui/login")
        # the only error the browser reports is the sign-in's own 401
        assert all("401" in e for e in w.errors), w.errors
    finally:
        w.close()

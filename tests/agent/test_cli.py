"""The CLI as real processes: install a package, `slmops agent run`, query it with `slmops agent ask`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from slmops_cli.procs import slmops_cmd

SLMOPS = slmops_cmd()


def slmops(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SLMOPS, "agent", *args], capture_output=True, text=True, timeout=timeout, env=env)


def agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_AGENT_")}
    env.update({"SLMOPS_AGENT_THREADS": "1", "SLMOPS_AGENT_SHUTDOWN_GRACE_S": "3"}, **extra)
    return env


class RunningAgent:
    def __init__(self, state: Path, env: dict[str, str] | None = None) -> None:
        self.state = state
        self.log = state.parent / f"agent-{time.monotonic_ns()}.log"
        self.log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            [*SLMOPS, "agent", "run", "--state-dir", str(state), "--grpc-port", "0"],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env=env or agent_env(),
        )
        deadline = time.monotonic() + 60
        while "listening on" not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        self.tcp = (state / "grpc.addr").read_text().strip()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log_file.close()
        return int(self.proc.returncode)


@pytest.fixture
def installed(short_dir: Path, pkg_v1: Path, signing_key: tuple[Path, Path]) -> Path:
    state = short_dir / "state"
    out = slmops("install", str(pkg_v1), "--state-dir", str(state), "--trust-key", str(signing_key[1]), env=agent_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("COMMITTED 1.0.0") and "in slot a" in out.stdout
    return state


@pytest.fixture
def running(installed: Path) -> Iterator[RunningAgent]:
    agent = RunningAgent(installed)
    try:
        yield agent
    finally:
        agent.stop()


def test_run_serves_metrics_and_the_openai_api(running: RunningAgent) -> None:
    import httpx
    import openai

    url = "http://" + (running.state / "metrics.addr").read_text().strip()
    assert url.startswith("http://127.0.0.1:")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    reply = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "Hello"}], max_tokens=5
    )
    assert reply.choices[0].message.content and reply.usage is not None and reply.usage.completion_tokens == 5
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'slmops_agent_requests_total{code="OK"} 1.0' in metrics
    assert (
        'slmops_agent_active_model{name="tiny-llama",package_id=' in metrics
        and "slmops_agent_queue_depth 0.0" in metrics
    )
    client.close()
    assert running.stop() == 0
    assert not (running.state / "metrics.addr").exists()


def test_run_and_ask(running: RunningAgent) -> None:
    state = running.state
    out = slmops("ask", "What is the capital of France?", "--state-dir", str(state), "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()  # the streamed answer
    assert "8 tokens" in out.stderr and "tokens/s" in out.stderr and "TTFT" in out.stderr and "1.0.0" in out.stderr

    js = slmops("ask", "Hello", "--target", running.tcp, "--json", "--max-new-tokens", "4", "--temperature", "0.8")
    assert js.returncode == 0, js.stderr
    answer = json.loads(js.stdout)
    assert answer["completion_tokens"] == 4 and answer["finish_reason"] == "LENGTH"
    assert answer["model_version"] == "1.0.0" and answer["time_to_first_token_ms"] > 0

    status = slmops("status", "--state-dir", str(state), "--json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["update_state"] == "COMMITTED" and info["active_model"]["version"] == "1.0.0"
    assert info["active_slot"] == "a" and int(info["requests_total"]) == 2 and info["device_id"] == ""
    table = slmops("status", "--target", running.tcp)
    assert table.returncode == 0 and "COMMITTED" in table.stdout and "tiny-llama 1.0.0" in table.stdout

    models = slmops("models", "--state-dir", str(state), "--json")
    assert [(m["version"], m["slot"], m["active"]) for m in json.loads(models.stdout)] == [("1.0.0", "a", True)]

    bad = slmops("ask", "Hello", "--state-dir", str(state), "--raw", "--system", "x")
    assert bad.returncode == 2 and "--system needs a chat request" in bad.stderr
    raw = slmops("ask", "Hello", "--state-dir", str(state), "--raw", "--json", "--max-new-tokens", "2")
    assert json.loads(raw.stdout)["completion_tokens"] == 2
    invalid = slmops("ask", "", "--state-dir", str(state))
    assert invalid.returncode == 1 and "INVALID_ARGUMENT: messages[0].content is empty" in invalid.stderr


def test_graceful_shutdown_and_a_second_agent_is_refused(running: RunningAgent) -> None:
    second = slmops("run", "--state-dir", str(running.state), "--grpc-port", "0", env=agent_env(), timeout=60)
    assert second.returncode == 1 and "another agent" in second.stderr and str(running.proc.pid) in second.stderr
    assert running.stop() == 0
    log = running.log.read_text()
    assert "slmops agent stopped" in log
    assert not (running.state / "agent.sock").exists() and not (running.state / "grpc.addr").exists()


def test_ask_without_an_agent_and_installing_an_untrusted_package(
    short_dir: Path, other_key_pkg: Path, pkg_v1: Path
) -> None:
    out = slmops("ask", "hi", "--state-dir", str(short_dir / "nothing"))
    assert out.returncode == 1 and out.stderr.startswith("error: cannot reach the agent at")
    bad = slmops("install", str(other_key_pkg), "--state-dir", str(short_dir / "s"), env=agent_env())
    assert bad.returncode == 1 and "ROLLED_BACK: no trusted signing keys configured" in bad.stderr
    nothing = slmops("install", str(short_dir), "--state-dir", str(short_dir / "s"), env=agent_env())
    assert nothing.returncode == 1 and "is not a package folder" in nothing.stderr


def test_run_serves_unavailable_until_a_model_is_installed(short_dir: Path) -> None:
    agent = RunningAgent(short_dir / "empty")
    try:
        out = slmops("ask", "hi", "--target", agent.tcp)
        assert out.returncode == 1 and "UNAVAILABLE: no model is loaded yet" in out.stderr
    finally:
        assert agent.stop() == 0


# -- crash injection: SIGKILL right after each update state is saved, then restart ----------------
@pytest.mark.parametrize("crash_in", ["FETCHING", "VERIFYING", "STAGED", "TESTING", "COMMITTED"])
def test_sigkill_in_each_state_then_restart(installed: Path, pkg_v2: Path, crash_in: str) -> None:
    crashed = slmops(
        "install", str(pkg_v2), "--state-dir", str(installed), env=agent_env(SLMOPS_AGENT_CRASH_AFTER_STATE=crash_in)
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert json.loads((installed / "state.json").read_text())["state"] == crash_in
    agent = RunningAgent(installed)
    try:
        # it serves the old or the new version from the first request on, and ends on the new one
        deadline = time.monotonic() + 60
        while True:
            status = json.loads(slmops("status", "--target", agent.tcp, "--json").stdout)
            version = status.get("active_model", {}).get("version")
            assert version in ("1.0.0", "2.0.0"), status
            if status["update_state"] == "COMMITTED" and version == "2.0.0":
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        answer = json.loads(slmops("ask", "Hello", "--target", agent.tcp, "--json", "--max-new-tokens", "3").stdout)
        assert answer["model_version"] == "2.0.0"
    finally:
        assert agent.stop() == 0

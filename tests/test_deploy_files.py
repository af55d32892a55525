"""The deployment files shipped in the repository: the systemd units (checked by `systemd-analyze verify`
and `systemd-analyze security --offline` where systemd is installed, and always parsed: ExecStart is
a real `slmops` command and its config file is the sample one the README installs), the sample
config files (valid for their programs' settings) and the sample mosquitto.conf (a real Mosquitto
starts with it and ends the connection of a 64 MiB PUBLISH)."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from slmops_agent.settings import AgentSettings
from slmops_cli.procs import slmops_cmd
from slmops_cli.settings_files import load
from slmops_fleet.mqtt_limits import DEFAULT_MAX_PACKET, mosquitto_limits
from slmops_fleet.settings import FleetSettings
from slmops_testing.attacks import send_oversized_publish
from slmops_testing.brokers import DYNSEC_PLUGIN, MOSQUITTO, MOSQUITTO_CTRL, MosquittoBroker, free_port

ROOT = Path(__file__).resolve().parents[1]
UNITS = {
    "fleet": ROOT / "fleet/deploy/systemd/slmops-fleet.service",
    "agent": ROOT / "agent/deploy/systemd/slmops-agent.service",
}
SAMPLES = {"fleet": ROOT / "fleet/deploy/fleet.toml", "agent": ROOT / "agent/deploy/agent.toml"}
INSTALLED_BIN = "/opt/slmops/bin/slmops"


def _unit(program: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNITS[program].read_text())
    return parser


def _local_copy(program: str, tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's slmops (verify checks the file exists)."""
    local = shutil.which("slmops", path=str(Path(slmops_cmd()[0]).parent)) or slmops_cmd()[0]
    out = tmp_path / UNITS[program].name
    out.write_text(UNITS[program].read_text().replace(INSTALLED_BIN, local))
    return out


@pytest.mark.parametrize("program", ["fleet", "agent"])
def test_the_unit_runs_a_real_command_with_the_sample_config(program: str) -> None:
    service = _unit(program)["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == INSTALLED_BIN and argv[1:3] == [program, "serve" if program == "fleet" else "run"]
    config = Path(argv[argv.index("--config") + 1])
    assert config == Path("/etc/slmops") / SAMPLES[program].name
    assert f"install -D -m 0644 {SAMPLES[program].relative_to(ROOT)} {config}" in UNITS[program].read_text()
    assert str(config) in (ROOT / "README.md").read_text()
    folder_flag = "--data-dir" if program == "fleet" else "--state-dir"
    assert argv[argv.index(folder_flag) + 1] == f"/var/lib/{service['StateDirectory']}"
    done = subprocess.run([*slmops_cmd(*argv[1:3]), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--config" in done.stdout and folder_flag in done.stdout, done.stdout
    for option, value in {
        "DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "CapabilityBoundingSet": "", "SystemCallFilter": "~@privileged @resources",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "Restart": "on-failure",
    }.items():  # fmt: skip
        assert service[option] == value, option


@pytest.mark.parametrize("program", ["fleet", "agent"])
def test_systemd_accepts_the_unit_and_rates_it_well_sandboxed(program: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (the unit is still parsed by the test above)")
    unit = _local_copy(program, tmp_path)
    done = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    done = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=20", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    level = float(done.stdout.rsplit("Overall exposure level for", 1)[1].split(":", 1)[1].split()[0])
    assert level <= 2.0, done.stdout  # "OK"; with only DynamicUser=yes a unit scores 8.4


@pytest.mark.parametrize(("program", "cls"), [("fleet", FleetSettings), ("agent", AgentSettings)])
def test_the_sample_config_is_valid_for_its_program(program: str, cls: type, tmp_path: Path) -> None:
    loaded = load(cls, flags={"data_dir" if program == "fleet" else "state_dir": tmp_path}, config=SAMPLES[program])
    assert loaded.file == SAMPLES[program] and len(loaded.sources) > 5
    if program == "fleet":
        assert loaded.settings.mqtt_max_packet_bytes == DEFAULT_MAX_PACKET


def test_the_sample_mosquitto_conf_ends_an_oversized_publish(tmp_path: Path) -> None:
    sample = (ROOT / "fleet/deploy/mosquitto.conf").read_text()
    assert all(line in sample.splitlines() for line in mosquitto_limits(DEFAULT_MAX_PACKET))
    if not Path(MOSQUITTO).exists() or not DYNSEC_PLUGIN.exists():
        pytest.fail(f"this test needs mosquitto 2 with its dynamic security plugin ({MOSQUITTO}, {DYNSEC_PLUGIN})")
    dynsec = tmp_path / "dynamic-security.json"
    subprocess.run(
        [MOSQUITTO_CTRL, "dynsec", "init", str(dynsec), "admin", "pw-12345"], check=True, capture_output=True
    )
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        sample.replace("listener 1883 0.0.0.0", f"listener {port} 127.0.0.1")
        .replace("/var/lib/mosquitto/dynamic-security.json", str(dynsec))
        .replace("/var/lib/mosquitto/", f"{tmp_path}/")
        .replace("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so", str(DYNSEC_PLUGIN))
        .replace("log_dest syslog", "log_dest stdout\nuser root")
    )
    broker = MosquittoBroker("127.0.0.1", port, "admin", "pw-12345", tmp_path, conf, tmp_path / "mosquitto.log")
    broker.start()
    try:
        admitted, sent = send_oversized_publish(
            "127.0.0.1", port, username="admin", password="pw-12345", client_id="probe", topic="x", size=64 << 20
        )
        assert admitted and sent < 16 << 20, sent
        admitted, sent = send_oversized_publish(
            "127.0.0.1", port, username="admin", password="pw-12345", client_id="probe", topic="x", size=1 << 20
        )
        assert admitted and sent == 1 << 20
    finally:
        broker.stop()

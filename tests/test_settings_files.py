"""Config files (TOML) for `slmops fleet serve` and `slmops agent run`: validated by the programs' own
settings classes, flags > environment > file > defaults, unknown keys and wrong types named with the
file, misspelt SLMOPS_* variables warned about; through `slmops_cli.settings_files` and through the
real commands (a `slmops fleet serve --config` process, `config show` of both programs)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from slmops_agent.settings import AgentSettings
from slmops_cli.procs import Service, slmops_cmd
from slmops_cli.settings_files import SettingsError, load, mask, misspelt_environment
from slmops_fleet.settings import FleetSettings
from slmops_testing.processes import healthy, read_json


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_flags_beat_the_environment_which_beats_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLMOPS_FLEET_CHUNK_SIZE", raising=False)
    file = _write(
        tmp_path / "fleet.toml",
        f'data_dir = "{tmp_path / "data"}"\nchunk_size = 300000\nbroadcast_rate = 7\n'
        'signing_keys = ["/keys/a.pub"]\ntelemetry_max_rows_per_device = 1000\n',
    )
    loaded = load(FleetSettings, flags={}, config=file)
    s = loaded.settings
    assert (s.chunk_size, s.broadcast_rate, s.signing_keys) == (300000, 7, [Path("/keys/a.pub")])
    assert s.telemetry_max_rows_per_device == 1000 and s.data_dir == tmp_path / "data"
    assert loaded.sources["chunk_size"] == str(file) and loaded.file == file
    monkeypatch.setenv("SLMOPS_FLEET_CHUNK_SIZE", "400000")
    loaded = load(FleetSettings, flags={"broadcast_rate": None}, config=file)  # None: a flag not given
    assert (loaded.settings.chunk_size, loaded.settings.broadcast_rate) == (400000, 7)
    assert loaded.sources["chunk_size"] == "$SLMOPS_FLEET_CHUNK_SIZE"
    loaded = load(FleetSettings, flags={"chunk_size": 500000}, config=file)
    assert loaded.settings.chunk_size == 500000 and loaded.sources["chunk_size"] == "flag"
    assert loaded.effective()["http_port"] == {"value": 0, "source": "default"}


def test_the_default_file_is_read_only_where_it_exists(tmp_path: Path) -> None:
    def default(values: dict[str, object]) -> Path:
        return Path(str(values["state_dir"])) / "agent.toml"

    loaded = load(AgentSettings, flags={"state_dir": tmp_path}, default_config=default)
    assert loaded.file is None and loaded.settings.max_batch == 4
    _write(tmp_path / "agent.toml", "max_batch = 2\nspinning = false\n")
    loaded = load(AgentSettings, flags={"state_dir": tmp_path}, default_config=default)
    assert loaded.file == tmp_path / "agent.toml" and loaded.settings.max_batch == 2
    assert loaded.settings.spinning is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("chunk_sise = 300000\n", "unknown setting 'chunk_sise' (did you mean chunk_size?)"),
        ("[fleet]\nchunk_size = 1\n", "unknown setting 'fleet' (settings are top-level keys, not tables)"),
        ('chunk_size = "big"\n', "chunk_size (from {file}): Input should be a valid integer"),
        ("chunk_size = 1\n", "chunk_size (from {file}): chunk_size must be between"),
        ("chunk_size = \n", "{file} is not valid TOML"),
    ],
    ids=["unknown", "table", "type", "range", "toml"],
)
def test_a_bad_file_is_refused_naming_the_key_and_the_file(tmp_path: Path, text: str, message: str) -> None:
    file = _write(tmp_path / "fleet.toml", text)
    with pytest.raises(SettingsError) as caught:
        load(FleetSettings, flags={"data_dir": tmp_path}, config=file)
    assert message.format(file=file) in str(caught.value) and str(file) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_agent_refuses_what_the_fleet_would_take(tmp_path: Path) -> None:
    """Each program's file is checked against its own settings."""
    file = _write(tmp_path / "agent.toml", "chunk_size = 300000\n")
    with pytest.raises(SettingsError, match="unknown setting 'chunk_size'"):
        load(AgentSettings, flags={}, config=file)
    with pytest.raises(SettingsError, match="cannot read the config file"):
        load(AgentSettings, flags={}, config=tmp_path / "missing.toml")


def test_misspelt_variables_are_warned_about_with_the_nearest_setting() -> None:
    environ = {
        "SLMOPS_FLEET_CHUNKSIZE": "1",
        "SLMOPS_FLEET_CHUNK_SIZE": "300000",
        "SLMOPS_FLEET_URL": "http://x",
        "slmops_fleet_data_dir": "/x",  # names are not case-sensitive
        "SLMOPS_FLEET_ZZZ": "1",
        "SLMOPS_AGENT_THREDS": "2",
        "PATH": "/bin",
    }
    warnings = misspelt_environment(FleetSettings, environ, also_known=("SLMOPS_FLEET_URL",))
    assert warnings == [
        "SLMOPS_FLEET_CHUNKSIZE is not a setting of slmops and is ignored (did you mean SLMOPS_FLEET_CHUNK_SIZE?)",
        "SLMOPS_FLEET_ZZZ is not a setting of slmops and is ignored",
    ]
    (agent,) = misspelt_environment(AgentSettings, environ)
    assert agent.endswith("(did you mean SLMOPS_AGENT_THREADS?)")


def test_secrets_are_masked() -> None:
    assert mask("broker_url", "mqtt://fleet:s3cret@broker:1883") == "mqtt://fleet:***@broker:1883"
    assert mask("database_url", "postgresql+psycopg://u:pw@db/x") == "postgresql+psycopg://u:***@db/x"
    assert mask("auth_token", "abcdefabcdefabcdef") == "***" and mask("auth_token", None) is None
    assert mask("broker_url", "mqtt://broker:1883") == "mqtt://broker:1883"


def _slmops(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(slmops_cmd(*args), capture_output=True, text=True, timeout=120, env=env)


def test_fleet_serve_runs_with_a_config_file_and_refuses_a_bad_one(tmp_path: Path) -> None:
    import os

    data = tmp_path / "data"
    good = _write(
        tmp_path / "fleet.toml",
        f'data_dir = "{data}"\ntelemetry_max_rows_per_device = 1234\ntelemetry_max_age_s = 0\n'
        'broker_provisioning = "dynsec"\n',
    )
    env = {**os.environ, "SLMOPS_FLEET_TELEMETRY_MAX_AGE": "5"}  # a typo of telemetry_max_age_s
    service = Service("fleet", ["fleet", "serve", "--config", str(good)], tmp_path / "fleet.log", env=env)
    try:
        info = service.wait_for(
            lambda: (i := read_json(data / "fleet.json")) and healthy(i["url"]) and i, timeout=60, what="fleet.json"
        )
        r = httpx.get(info["url"] + "/v1/status", headers={"Authorization": f"Bearer {info['admin_token']}"})
        assert r.json()["limits"]["retention"] == {**r.json()["limits"]["retention"], "max_rows_per_device": 1234}
        assert r.json()["limits"]["retention"]["max_age_s"] == 0
    finally:
        service.stop()
    log = (tmp_path / "fleet.log").read_text()
    assert f"config file   {good}" in log
    assert "SLMOPS_FLEET_TELEMETRY_MAX_AGE is not a setting" in log and "SLMOPS_FLEET_TELEMETRY_MAX_AGE_S?" in log
    bad = _write(tmp_path / "bad.toml", f'data_dir = "{data}"\nhttp_prot = 8080\n')
    done = _slmops("fleet", "serve", "--config", str(bad))
    assert done.returncode == 1 and "unknown setting 'http_prot' (did you mean http_port?)" in done.stderr
    assert str(bad) in done.stderr and not (tmp_path / "data" / "fleet.json").exists()


def test_config_show_prints_the_effective_settings(tmp_path: Path) -> None:
    import os

    fleet_file = _write(tmp_path / "fleet.toml", 'broker_url = "mqtts://fleet:hunter2@mq.example:8883"\n')
    env = {**os.environ, "SLMOPS_FLEET_CHUNK_SIZE": "300000"}
    done = _slmops(
        "fleet", "config", "show", "--config", str(fleet_file), "--data-dir", str(tmp_path), "--json", env=env
    )
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["config_file"] == str(fleet_file) and "hunter2" not in done.stdout
    assert shown["settings"]["broker_url"] == {"value": "mqtts://fleet:***@mq.example:8883", "source": str(fleet_file)}
    assert shown["settings"]["chunk_size"] == {"value": 300000, "source": "$SLMOPS_FLEET_CHUNK_SIZE"}
    assert shown["settings"]["data_dir"]["source"] == "flag"
    table = _slmops("fleet", "config", "show", "--config", str(fleet_file), env=env)
    assert table.returncode == 0 and "mqtts://fleet:***@mq.example:8883" in table.stdout

    state = tmp_path / "agent"
    state.mkdir()
    _write(state / "agent.toml", 'auth_token = "0123456789abcdef0123"\nmax_batch = 3\n')
    done = _slmops("agent", "config", "show", "--state-dir", str(state), "--json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["settings"]["max_batch"] == {"value": 3, "source": str(state / "agent.toml")}
    assert shown["settings"]["auth_token"]["value"] == "***" and "0123456789abcdef" not in done.stdout
    _write(state / "agent.toml", "max_batch = 0\n")
    done = _slmops("agent", "config", "show", "--state-dir", str(state))
    assert done.returncode == 2 and f"max_batch (from {state / 'agent.toml'})" in done.stderr


def test_agent_run_takes_its_settings_from_a_config_file(tmp_path: Path) -> None:
    """The file names the state folder, the gRPC address and the metrics port; a flag given on top wins."""
    import os
    import socket

    state = tmp_path / "s"  # short: a Unix socket path has a length limit
    file = _write(
        tmp_path / "agent.toml",
        f'state_dir = "{state}"\ngrpc_address = "127.0.0.1:0"\nmetrics_port = -1\nthreads = 1\nshutdown_grace_s = 2\n',
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_AGENT_")}
    service = Service(
        "agent", ["agent", "run", "--config", str(file), "--log-level", "DEBUG"], tmp_path / "a.log", env=env
    )
    try:
        addr = service.wait_for(
            lambda: (state / "grpc.addr").is_file() and (state / "grpc.addr").read_text().strip(),
            timeout=60,
            what="grpc.addr",
        )
        host, _, port = str(addr).rpartition(":")
        with socket.create_connection((host, int(port)), timeout=5):
            pass
        assert not (state / "metrics.addr").exists()  # metrics_port = -1: off
    finally:
        assert service.stop() == 0
    assert "DEBUG" in (tmp_path / "a.log").read_text()  # the flag beat the file's default INFO


def test_agent_run_keeps_the_files_grpc_host_when_a_port_flag_is_given(tmp_path: Path) -> None:
    import os

    state = tmp_path / "s"
    file = _write(
        tmp_path / "agent.toml",
        f'state_dir = "{state}"\ngrpc_address = "127.0.0.2:50051"\nmetrics_port = -1\nthreads = 1\n',
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_AGENT_")}
    service = Service("agent", ["agent", "run", "--config", str(file), "--grpc-port", "0"], tmp_path / "a.log", env=env)
    try:
        addr = service.wait_for(
            lambda: (state / "grpc.addr").is_file() and (state / "grpc.addr").read_text().strip(),
            timeout=60,
            what="grpc.addr",
        )
        assert str(addr).startswith("127.0.0.2:") and not str(addr).endswith(":50051")
    finally:
        assert service.stop() == 0


def test_config_show_prints_plain_text_where_rich_is_not_installed(tmp_path: Path) -> None:
    """The device's install has no rich: `slmops agent config show` prints an aligned text table."""
    import sys

    state = tmp_path / "agent"
    state.mkdir()
    _write(state / "agent.toml", "max_batch = 3\n")
    code = (
        "import sys\n"
        "sys.modules['rich'] = None  # as on a device: importing it fails\n"
        "from slmops_cli.main import main\n"
        f"sys.argv = ['slmops', 'agent', 'config', 'show', '--state-dir', {str(state)!r}]\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"effective settings (config file: {state / 'agent.toml'})"
    assert lines[1].split() == ["setting", "value", "from"] and set(lines[2]) == {"-", " "}
    row = next(line for line in lines if line.startswith("max_batch "))
    assert row.split() == ["max_batch", "3", str(state / "agent.toml")]
    assert row.index("3") == lines[1].index("value")  # columns aligned under the header

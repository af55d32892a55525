"""`slmops agent ...`: enroll, run, install, ask, status, models.

Cheap to import: every heavy module is imported inside the command that needs it. Plain click, not
typer: the device's install (agent/pyproject.toml) carries neither typer nor rich; tables print as
aligned text.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from slmops_agent.settings import AgentSettings
    from slmops_cli.settings_files import Loaded

F = TypeVar("F", bound=Callable[..., Any])
_CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.group(help="The on-device agent: enroll, run, ask.", context_settings=_CONTEXT, no_args_is_help=True)
def app() -> None:
    pass


_STATE_HELP = "State folder (default: $SLMOPS_AGENT_STATE_DIR or ~/.slmops/agent)."
_TOKEN_HELP = "Bearer token for an agent reached over TCP off loopback (or $SLMOPS_AGENT_AUTH_TOKEN)."
_CA_HELP = "PEM file of the CA (or self-signed certificate) to trust: connect with TLS."
_CONFIG_HELP = (
    "TOML file of settings (or $SLMOPS_AGENT_CONFIG; default: <state>/agent.toml when it exists); "
    "flags and SLMOPS_AGENT_* override it."
)
_PATH = click.Path(path_type=Path)
state_dir_opt = click.option("--state-dir", "state_dir", type=_PATH, default=None, help=_STATE_HELP)
target_opt = click.option("--target", default=None, help="unix:PATH or host:port (default: the local agent).")
token_opt = click.option("--token", default=None, envvar="SLMOPS_AGENT_AUTH_TOKEN", help=_TOKEN_HELP)
tls_ca_opt = click.option("--tls-ca", "tls_ca", type=_PATH, default=None, help=_CA_HELP)
config_opt = click.option("--config", type=_PATH, default=None, help=_CONFIG_HELP)


def _json_opt(help_text: str) -> Callable[[F], F]:
    return click.option("--json", "as_json", is_flag=True, default=False, help=help_text)


def _remote(f: F) -> F:
    """The options of a command that calls the running agent."""
    for option in (tls_ca_opt, token_opt, state_dir_opt, target_opt):
        f = option(f)
    return f


def _fail(message: str, code: int = 1) -> click.exceptions.Exit:
    click.echo(f"error: {message}", err=True)
    return click.exceptions.Exit(code)


def _loaded(config: Path | None = None, **flags: Any) -> Loaded[AgentSettings]:
    """Settings from flags > SLMOPS_AGENT_* > the config file (--config, $SLMOPS_AGENT_CONFIG, or
    <state_dir>/agent.toml when it exists) > defaults; misspelt SLMOPS_AGENT_* variables warned about."""
    import os

    from slmops_agent.settings import DEFAULT_STATE_DIR, AgentSettings
    from slmops_cli.settings_files import SettingsError, load

    def default_file(values: dict[str, Any]) -> Path:
        return Path(values.get("state_dir") or DEFAULT_STATE_DIR).expanduser() / "agent.toml"

    named = config or (Path(os.environ["SLMOPS_AGENT_CONFIG"]) if os.environ.get("SLMOPS_AGENT_CONFIG") else None)
    try:
        loaded = load(
            AgentSettings,
            flags=flags,
            config=named,
            default_config=default_file,
            also_known_env=("SLMOPS_AGENT_CONFIG",),
        )
    except SettingsError as exc:
        raise _fail(str(exc), 2) from None
    for warning in loaded.warnings:
        click.echo(f"warning: {warning}", err=True)
    return loaded


def _settings(config: Path | None = None, **flags: Any) -> AgentSettings:
    return _loaded(config, **flags).settings


def _setup_logging(level: str) -> None:
    import logging

    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
@click.option(
    "--fleet", required=True, help="The fleet's URL, e.g. https://fleet.local:8443 (http:// on loopback only)."
)
@click.option("--token", required=True, help="The one-time enrollment token.")
@click.option("--name", default="", help="A name for this device.")
@click.option(
    "--ca",
    type=_PATH,
    default=None,
    help="The fleet's CA certificate (PEM, its tls/ca.pem) to verify it with; default: system CAs.",
)
@click.option(
    "--ca-fingerprint", default=None, help="Or the fleet CA's fingerprint (sha256:HEX, as `fleet serve` prints)."
)
@click.option(
    "--trust-key",
    multiple=True,
    help="Pin this package signing key (hex or *.pub) instead of the fleet's; repeatable.",
)
@state_dir_opt
@click.option("--force", is_flag=True, default=False, help="Enroll again even if this device is enrolled.")
@_json_opt("Print the result as JSON.")
def enroll(
    fleet: str,
    token: str,
    name: str,
    ca: Path | None,
    ca_fingerprint: str | None,
    trust_key: tuple[str, ...],
    state_dir: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Register this device with a fleet and store its credentials."""
    from slmops_agent.enroll import enroll as do_enroll
    from slmops_agent.errors import AgentError

    settings = _settings(state_dir=state_dir)
    try:
        creds = do_enroll(
            fleet,
            token,
            settings.state_dir,
            name=name,
            force=force,
            ca_file=ca,
            ca_fingerprint=ca_fingerprint,
            trust_keys=list(trust_key),
        )
    except AgentError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        click.echo(
            json.dumps(
                {
                    "device_id": creds.device_id,
                    "state_dir": str(settings.state_dir),
                    "mqtt": f"{creds.mqtt.host}:{creds.mqtt.port}",
                    "signing_keys": len(creds.signing_keys),
                }
            )
        )
    else:
        click.echo(
            f"enrolled as {creds.device_id}; broker {creds.mqtt.host}:{creds.mqtt.port}"
            f"{' (TLS)' if creds.mqtt.tls else ''}; "
            f"{len(creds.signing_keys)} signing key(s) pinned; credentials in {settings.state_dir}"
        )


@app.command()
@config_opt
@state_dir_opt
@click.option(
    "--grpc-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="TCP port on 127.0.0.1 (0: a free one, see <state>/grpc.addr).",
)
@click.option("--socket", type=_PATH, default=None, help="Unix socket (default <state>/agent.sock).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Inference threads (default: free cores).")
@click.option(
    "--metrics-port",
    type=click.IntRange(-1, 65535),
    default=None,
    help="HTTP port on 127.0.0.1 for /metrics and the OpenAI API /v1 (0: free, see <state>/metrics.addr; -1: off).",
)
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR.")
def run(
    config: Path | None,
    state_dir: Path | None,
    grpc_port: int | None,
    socket: Path | None,
    threads: int | None,
    metrics_port: int | None,
    log_level: str | None,
) -> None:
    """Run the agent until SIGTERM or SIGINT: serve gRPC and /metrics, follow the fleet, send telemetry.

    Settings: flags > SLMOPS_AGENT_* > the --config file (TOML, the settings' names as keys) > defaults;
    `slmops agent config show` prints them."""
    import asyncio

    from slmops_agent.daemon import Agent
    from slmops_agent.errors import AgentError

    settings = _settings(
        config, state_dir=state_dir, grpc_socket=socket, threads=threads, metrics_port=metrics_port, log_level=log_level
    )
    if grpc_port is not None:  # the port of grpc_address (from the environment, the file or the default)
        host = settings.grpc_address.rpartition(":")[0] or "127.0.0.1"
        settings = type(settings).model_validate({**settings.model_dump(), "grpc_address": f"{host}:{grpc_port}"})
    _setup_logging(settings.log_level)

    def ready(addresses: list[str]) -> None:
        who = f"device {agent.device_id}" if agent.device_id else "not enrolled (local only)"
        click.echo(f"slmops agent listening on {', '.join(addresses)}; {who}; state {settings.state_dir}", err=True)

    try:
        agent = Agent(settings)
        asyncio.run(agent.serve(ready))
    except AgentError as exc:
        raise _fail(str(exc)) from None
    click.echo("slmops agent stopped", err=True)


@app.command()
@click.argument("package", type=_PATH)
@state_dir_opt
@click.option(
    "--trust-key", multiple=True, help="Pin a signing key first (hex of the raw Ed25519 key, or a .pub file)."
)
@click.option("--threads", type=click.IntRange(min=1), default=None)
@_json_opt("Print the outcome as JSON.")
def install(
    package: Path, state_dir: Path | None, trust_key: tuple[str, ...], threads: int | None, as_json: bool
) -> None:
    """Side-load a package without a fleet (the agent must be stopped): verify, stage, test, commit.

    PACKAGE: a package folder (manifest.signed.pb + blobs/)."""
    from slmops_agent.daemon import install_package
    from slmops_agent.errors import AgentError
    from slmops_agent.layout import StateLayout
    from slmops_agent.signing_keys import add_trusted_key

    settings = _settings(state_dir=state_dir, threads=threads)
    _setup_logging("WARNING")
    try:
        layout = StateLayout(settings.state_dir)
        layout.create()
        for key in trust_key:
            add_trusted_key(layout, key)
        report = install_package(settings, package)
    except AgentError as exc:
        raise _fail(str(exc)) from None
    except TimeoutError as exc:
        raise _fail(f"the install did not finish: {exc}") from None
    if as_json:
        click.echo(
            json.dumps(
                {
                    "state": report.state.value,
                    "reason": report.reason,
                    "active_slot": report.active_slot,
                    "active_package_id": report.active_package_id,
                    "active_version": report.active_version,
                }
            )
        )
    if report.state.value != "COMMITTED":
        raise _fail(f"ROLLED_BACK: {report.reason}")
    if not as_json:
        click.echo(f"COMMITTED {report.active_version} ({report.active_package_id[:12]}) in slot {report.active_slot}")


def _text_or_file(value: str) -> str:
    if not value.startswith("@"):
        return value
    try:
        return Path(value[1:]).read_text()
    except OSError as exc:
        raise _fail(f"cannot read {value[1:]}: {exc.strerror}", 2) from None


def _target(target: str | None, state_dir: Path | None) -> str:
    if target:
        return target
    settings = _settings(state_dir=state_dir)
    if settings.socket_path.exists():
        return f"unix:{settings.socket_path}"
    addr = settings.state_dir / "grpc.addr"
    if addr.exists():
        return addr.read_text().strip()
    return settings.grpc_address


def _channel(where: str, tls_ca: Path | None) -> Any:
    """A gRPC channel to `where`: TLS when a CA file is given, plain otherwise."""
    from slmops_agent.client import open_channel

    if tls_ca is None:
        return open_channel(where)
    try:
        ca = tls_ca.read_bytes()
    except OSError as exc:
        raise _fail(f"cannot read the CA file {tls_ca}: {exc.strerror}", 2) from None
    return open_channel(where, ca)


def _unary(
    target: str | None,
    state_dir: Path | None,
    method: str,
    request: Any,
    token: str | None = None,
    tls_ca: Path | None = None,
    timeout: float = 10.0,
) -> tuple[str, Any]:
    """Call one unary Inference RPC on the local agent; return (where, reply)."""
    import grpc

    from slmops_agent.client import bearer_metadata
    from slmops_protos.agent.v1 import agent_pb2_grpc

    where = _target(target, state_dir)
    with _channel(where, tls_ca) as channel:
        try:
            stub = agent_pb2_grpc.InferenceStub(channel)
            return where, getattr(stub, method)(request, timeout=timeout, metadata=bearer_metadata(token))
        except grpc.RpcError as exc:
            raise _rpc_error(exc, where) from None


def _to_dict(message: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _rpc_error(exc: Any, target: str) -> click.exceptions.Exit:
    code = exc.code()
    details = exc.details() or ""
    if code.name == "UNAVAILABLE" and ("connect" in details.lower() or "unix" in details.lower()):
        return _fail(f"cannot reach the agent at {target}: {details}")
    return _fail(f"{code.name}: {details}")


@app.command()
@click.argument("prompt")
@_remote
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=0, help="0: the agent's default.")
@click.option(
    "--temperature", type=click.FloatRange(min=0.0), default=None, help="0: greedy; unset: the package's default."
)
@click.option("--system", default=None, help="A system message first.")
@click.option("--raw", is_flag=True, default=False, help="Send PROMPT as a raw prompt, no chat template.")
@click.option("--adapter", default="", help="A LoRA adapter of the active model (see `agent models`).")
@click.option("--timeout", type=float, default=300.0, help="Seconds before the call is abandoned.")
@_json_opt("Print one JSON object at the end instead of streaming.")
@click.option("--json-schema", default=None, help="Hold the answer to this JSON Schema (JSON text, or @FILE).")
@click.option("--regex", default=None, help="Hold the answer to this regular expression (or @FILE).")
@click.option("--grammar", default=None, help="Hold the answer to this Lark grammar (or @FILE).")
def ask(
    prompt: str,
    target: str | None,
    state_dir: Path | None,
    token: str | None,
    tls_ca: Path | None,
    max_new_tokens: int,
    temperature: float | None,
    system: str | None,
    raw: bool,
    adapter: str,
    timeout: float,
    as_json: bool,
    json_schema: str | None,
    regex: str | None,
    grammar: str | None,
) -> None:
    """Ask the local agent; the answer streams to the terminal, then tokens/s and time to first token.

    PROMPT: the question (sent as one user message unless --raw)."""
    import grpc

    from slmops_agent.client import bearer_metadata
    from slmops_protos.agent.v1 import agent_pb2, agent_pb2_grpc

    if raw and system:
        raise _fail("--system needs a chat request; leave out --raw", 2)
    where = _target(target, state_dir)
    request = agent_pb2.GenerateRequest(max_new_tokens=max_new_tokens, adapter=adapter)
    if raw:
        request.prompt = prompt
    else:
        if system:
            request.messages.add(role="system", content=system)
        request.messages.add(role="user", content=prompt)
    if temperature is not None:
        request.temperature = temperature
    constraints = {"json_schema": json_schema, "regex": regex, "lark_grammar": grammar}
    given = {k: v for k, v in constraints.items() if v is not None}
    if len(given) > 1:
        raise _fail("give at most one of --json-schema, --regex and --grammar", 2)
    for field, value in given.items():
        setattr(request, field, _text_or_file(value))
    text: list[str] = []
    last: Any = None
    with _channel(where, tls_ca) as channel:
        stub = agent_pb2_grpc.InferenceStub(channel)
        try:
            for chunk in stub.Generate(request, timeout=timeout, metadata=bearer_metadata(token)):
                if chunk.text:
                    text.append(chunk.text)
                    if not as_json:
                        sys.stdout.write(chunk.text)
                        sys.stdout.flush()
                last = chunk
        except grpc.RpcError as exc:
            if text and not as_json:
                sys.stdout.write("\n")
            raise _rpc_error(exc, where) from None
    if last is None:
        raise _fail("the agent closed the stream without an answer")
    finish = agent_pb2.FinishReason.Name(last.finish_reason)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "text": "".join(text),
                    "finish_reason": finish,
                    "prompt_tokens": last.usage.prompt_tokens,
                    "completion_tokens": last.usage.completion_tokens,
                    "time_to_first_token_ms": round(last.timings.time_to_first_token_ms, 3),
                    "tokens_per_second": round(last.timings.tokens_per_second, 3),
                    "total_ms": round(last.timings.total_ms, 3),
                    "model_version": last.model_version,
                    "package_id": last.package_id,
                }
            )
        )
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    click.echo(
        f"[{last.usage.completion_tokens} tokens, {last.timings.tokens_per_second:.1f} tokens/s, "
        f"TTFT {last.timings.time_to_first_token_ms:.1f} ms, {finish}, model {last.model_version}]",
        err=True,
    )


@app.command()
@_remote
@_json_opt("Print JSON.")
def status(target: str | None, state_dir: Path | None, token: str | None, tls_ca: Path | None, as_json: bool) -> None:
    """The running agent's status (GetStatus)."""
    from slmops_cli.tables import print_table
    from slmops_protos.agent.v1 import agent_pb2

    where, reply = _unary(target, state_dir, "GetStatus", agent_pb2.GetStatusRequest(), token=token, tls_ca=tls_ca)
    if as_json:
        click.echo(json.dumps(_to_dict(reply)))
        return
    m = reply.active_model
    rows = [
        ("device", reply.device_id or "(not enrolled)"),
        ("update state", reply.update_state),
        ("active slot", reply.active_slot or "-"),
        ("model", f"{m.name} {m.version}" if m.package_id else "(none loaded)"),
        ("package", m.package_id[:16] if m.package_id else "-"),
        ("profile", m.profile or "-"),
        ("queue depth", str(reply.queue_depth)),
        ("requests", str(reply.requests_total)),
        ("errors", str(reply.errors_total)),
        ("agent version", reply.agent_version),
        ("uptime", f"{reply.uptime_s:.0f} s"),
    ]
    print_table(f"slmops agent at {where}", None, rows)


@app.command()
@_remote
@_json_opt("Print JSON.")
def models(target: str | None, state_dir: Path | None, token: str | None, tls_ca: Path | None, as_json: bool) -> None:
    """The packages installed in the agent's slots (ListModels)."""
    from slmops_cli.tables import print_table
    from slmops_protos.agent.v1 import agent_pb2

    where, reply = _unary(target, state_dir, "ListModels", agent_pb2.ListModelsRequest(), token=token, tls_ca=tls_ca)
    if as_json:
        click.echo(json.dumps([_to_dict(m) for m in reply.models]))
        return
    columns = ("slot", "active", "name", "version", "profile", "package", "adapters")
    rows = [
        (m.slot, "*" if m.active else "", m.name, m.version, m.profile, m.package_id[:16], ", ".join(m.adapters))
        for m in reply.models
    ]
    print_table(f"models at {where}", columns, rows)


@app.command("remove-adapter")
@click.argument("name")
@_remote
@_json_opt("Print the models afterwards as JSON.")
def remove_adapter(
    name: str, target: str | None, state_dir: Path | None, token: str | None, tls_ca: Path | None, as_json: bool
) -> None:
    """Stop serving one adapter of the running agent; its other adapters keep serving (RemoveAdapter).

    NAME: the adapter's name (see `agent models`)."""
    from slmops_protos.agent.v1 import agent_pb2

    request = agent_pb2.RemoveAdapterRequest(name=name)
    _, reply = _unary(target, state_dir, "RemoveAdapter", request, token=token, tls_ca=tls_ca, timeout=300)
    left = sorted({a for m in reply.models if m.active for a in m.adapters})
    if as_json:
        click.echo(json.dumps([_to_dict(m) for m in reply.models]))
    else:
        click.echo(f"removed adapter {name!r}; serving adapters: {', '.join(left) or 'none'}")


@app.group("config", no_args_is_help=True)
def config_app() -> None:
    """The agent's settings: what `run` would run with."""


@config_app.command("show")
@config_opt
@state_dir_opt
@_json_opt("Print JSON instead of a table.")
def config_show(config: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """Print the effective settings and where each comes from (secrets masked)."""
    from slmops_cli.settings_files import show

    show(_loaded(config, state_dir=state_dir), as_json=as_json)

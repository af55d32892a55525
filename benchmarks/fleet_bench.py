"""The fleet's delivery at scale: N simulated devices on Mosquitto and on the embedded broker (run by hand).

For each broker, database (`--database sqlite,postgresql`), number of fleet workers (`--workers 1,2`:
several `slmops fleet serve` on one PostgreSQL database and Mosquitto; SQLite and the embedded broker
take one) and N: a real fleet (`slmops fleet serve`, its own processes), N devices
enrolled over the fleet's HTTP API (each with its own broker credentials and ACL), then run as
lean simulated devices (slmops_testing/swarm.py `SwarmDevice`: many per process on one selector,
the real MQTT protocol through the real broker, a chunk bitmap, per-chunk and per-blob SHA-256
checks, repair requests for gaps, the manifest's signature checked). Two releases to all devices:

  full     a package of `--model-mib` of model data plus small files
  adapter  an adapter package (manifest kind "adapter", bound to the full package as its base) holding
           one LoRA-sized file (`--adapter-kib`): the fleet sends it only to devices running that base,
           and they fetch only its blob.

Measured: seconds from the rollout until the fleet sees every device COMMITTED; the fleet's egress
(chunk bytes it sent, broadcast + repair, from GET /v1/stats) over the bytes of the blobs the
release needed (target <= 1.2); the broker's peak RSS during the release (Mosquitto's process, or
the fleet's process for the embedded broker, which lives in it); the adapter release's egress over
the full release's (target <= 5%). Then telemetry: every device publishes TelemetryBatch messages
(`--telemetry-batches` x `--telemetry-samples`), and the rate is samples stored in the fleet's
database per second, from the first publish until the last row is in (target >= 10k/s), and each
worker's peak RSS and CPU seconds over the releases and the telemetry. On PostgreSQL, the database's
own ceiling beside it: the same samples written straight through the fleet's store
(`Store.insert_telemetry`, batches of the ingest's size) by one process and by as many processes as
workers, no MQTT in between, so the workers' scaling can be read against what the database scales to
on the same machine. With several workers (`--no-kill` skips it), a third release whose leading
worker is SIGKILLed mid-rollout while the devices send telemetry (benchmarks/fleet_bench_kill.py).

    python benchmarks/fleet_bench.py --devices 100,1000 --brokers mosquitto,embedded --json fleet.json
    python benchmarks/fleet_bench.py --devices 1000 --brokers mosquitto --database postgresql --workers 1,2
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import multiprocessing
import multiprocessing.connection
import secrets
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fleet_bench_kill import kill_release, kill_table  # this folder's module

from slmops_builder.keys import generate_key, public_path
from slmops_builder.packaging import read_manifest
from slmops_cli.procs import Service, wait_until
from slmops_fleet.client import FleetClient, FleetClientError
from slmops_testing.brokers import MosquittoBroker, start_mosquitto
from slmops_testing.databases import fresh_pg_database
from slmops_testing.packages import make_package, random_bytes
from slmops_testing.processes import healthy, read_json
from slmops_testing.swarm import swarm_worker

CHUNK = 512 * 1024
DEVICES_PER_WORKER = 250


class Fleet:
    """`slmops fleet serve` in `workers` processes (one fleet: the same database, broker and admin token),
    on an external Mosquitto or its embedded broker. Calls go to the first worker."""

    def __init__(
        self,
        workdir: Path,
        key_pub: Path,
        broker: MosquittoBroker | None,
        coalesce_s: float | None,
        *,
        workers: int = 1,
        database_url: str | None = None,
        log_level: str = "WARNING",
    ) -> None:
        token = workdir / "admin-token"
        token.write_text(secrets.token_urlsafe(32) + "\n")
        token.chmod(0o600)
        env = {"SLMOPS_FLEET_LOG_LEVEL": log_level}
        if coalesce_s is not None:
            env["SLMOPS_FLEET_COALESCE_WINDOW_S"] = str(coalesce_s)
        self.database_url = database_url
        self.services: list[Service] = []
        self.clients: list[FleetClient] = []
        for i in range(workers):
            data = workdir / f"fleet-{i}"
            args = ["fleet", "serve", "--data-dir", str(data), "--port", "0", "--broker-port", "0"]
            args += ["--trust-key", str(key_pub), "--chunk-size", str(CHUNK), "--admin-token-file", str(token)]
            args += ["--worker-id", f"w{i}"]
            if broker is not None:
                args += ["--broker-url", broker.url]
            if database_url is not None:
                args += ["--database-url", database_url]
            service = Service("fleet", args, workdir / f"fleet-{i}.log", env=env)
            self.services.append(service)
            info_path = data / "fleet.json"
            info: dict[str, Any] = service.wait_for(partial(read_json, info_path), timeout=60, what="fleet.json")
            service.wait_for(partial(healthy, str(info["url"])), timeout=60, what="a healthy API")
            self.clients.append(FleetClient(info["url"], info["admin_token"], timeout=120))
            if i == 0:
                self.info = info
        self.service = self.services[0]
        self.client = self.clients[0]

    def cpu_s(self) -> list[float]:
        """Each worker's CPU seconds (user + system) so far."""
        return [sum(psutil.Process(s.pid).cpu_times()[:2]) for s in self.services]

    def enroll(self, name: str, attempts: int = 3) -> dict[str, Any]:
        """Enroll one device (a fresh token per attempt: a lost response may have used the last one)."""
        key = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
        for attempt in range(attempts):
            try:
                token = self.client.create_token()["token"]
                body = {"token": token, "public_key": key, "name": name, "inventory": {"arch": "x86_64"}}
                response = httpx.post(self.info["url"] + "/v1/enroll", json=body, timeout=120)
                response.raise_for_status()
                return dict(response.json())
            except (FleetClientError, httpx.HTTPError) as exc:
                if attempt + 1 == attempts or not self.service.alive():
                    raise
                log(f"enrolling {name} failed ({exc}); again")
        raise AssertionError("unreachable")

    def totals(self) -> dict[str, int]:
        """The fleet's transfer counters, once no transfer is running (they are flushed as transfers end)."""

        def idle() -> dict[str, Any] | None:
            stats = self.client.stats()
            return None if stats["active_transfers"] else stats

        return dict(wait_until(idle, timeout=120, what="the fleet's transfers to end", interval=0.1)["totals"])

    def leader(self) -> int | None:
        """The index of the worker holding the rollout-driver lease, if one holds it."""
        leading = [i for i, c in enumerate(self.clients) if c.status()["rollout_driver"]["leading"]]
        return leading[0] if len(leading) == 1 else None

    def kill(self, i: int) -> None:
        """SIGKILL worker `i`; calls go to the first worker still running."""
        self.services[i].kill()
        self.service, self.client = next((s, c) for s, c in zip(self.services, self.clients, strict=True) if s.alive())

    def committed(self, package_id: str) -> int:
        return sum(
            d["state"] == "COMMITTED" and d["active_package_id"] == package_id for d in self.client.list_devices()
        )

    def telemetry_rows(self) -> int:
        return int(self.client.status().get("telemetry_samples", 0))

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        for service in self.services:
            service.stop()


class PeakRss:
    """Samples a process's RSS every 50 ms; `.peak_mb` since the last `reset()`."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return

    def reset(self) -> None:
        self.peak = self.process.memory_info().rss

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    def stop(self) -> None:
        self._stop.set()


class Workers:
    """Processes running swarms of simulated devices; their events come back over pipes."""

    def __init__(self, creds: list[dict[str, Any]], stall_s: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns = []
        self.procs = []
        for i in range(0, len(creds), DEVICES_PER_WORKER):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=swarm_worker, args=(creds[i : i + DEVICES_PER_WORKER], child, stall_s))
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        self.events: list[tuple[Any, ...]] = []

    def drain(self, timeout: float = 0.1) -> list[tuple[Any, ...]]:
        new: list[tuple[Any, ...]] = []
        for conn in multiprocessing.connection.wait(self.conns, timeout):
            assert isinstance(conn, multiprocessing.connection.Connection)
            new += conn.recv()
        self.events += new
        return new

    def count(self, kind: str, *match: Any) -> int:
        return sum(1 for e in self.events if e[0] == kind and e[2 : 2 + len(match)] == match)

    def send(self, *command: Any) -> None:
        for conn in self.conns:
            conn.send(command)

    def stop(self) -> None:
        self.send("stop")
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()


def packages(workdir: Path, key: Path, model_mib: float, adapter_kib: float, kill: bool) -> dict[str, Path]:
    """The full package, an adapter package bound to it (read its id from the full package), and with
    `kill` a second full package of new random model bytes (the release whose leading worker is killed)."""

    def full(kind: str, version: str, seed: int) -> Path:
        files = {
            "model.onnx.data": random_bytes(int(model_mib * 2**20), seed=seed),
            "model.onnx": random_bytes(64 * 1024, seed=2),
            "tokenizer.json": random_bytes(200 * 1024, seed=3),
            "genai_config.json": b'{"model": {"type": "llama"}}',
        }
        return make_package(files, workdir / kind / "package", key, name="bench", version=version)

    pkgs = {"full": full("full", "1.0.0", 1)}
    _, base_id = read_manifest(pkgs["full"])
    lora = {"support.onnx_adapter": random_bytes(int(adapter_kib * 1024), seed=4)}
    pkgs["adapter"] = make_package(lora, workdir / "adapter" / "package", key, name="support", adapter_of=base_id)
    if kill:
        pkgs["killed"] = full("killed", "2.0.0", 5)
    return pkgs


def blob_sizes(package: Path) -> dict[str, int]:
    return {f["sha256"]: int(f["size"]) for f in json.loads((package / "manifest.json").read_text())["files"]}


def bench(
    broker_kind: str, database: str, n_workers: int, n: int, args: argparse.Namespace, workdir: Path
) -> list[dict[str, Any]]:
    key = workdir / "keys" / "bench.key"
    generate_key(key)
    with contextlib.ExitStack() as stack:
        database_url = stack.enter_context(fresh_pg_database()) if database == "postgresql" else None
        broker = start_mosquitto(workdir / "mosquitto") if broker_kind == "mosquitto" else None
        if broker is not None:
            stack.callback(broker.stop)
        fleet = Fleet(
            workdir, public_path(key), broker, args.coalesce_s, workers=n_workers, database_url=database_url,
            log_level=args.fleet_log_level,
        )  # fmt: skip
        stack.callback(fleet.stop)
        return _bench(fleet, broker, (broker_kind, database, n_workers), n, args, workdir, key)
    raise AssertionError("unreachable")


def _bench(
    fleet: Fleet,
    broker: MosquittoBroker | None,
    setup: tuple[str, str, int],
    n: int,
    args: argparse.Namespace,
    workdir: Path,
    key: Path,
) -> list[dict[str, Any]]:
    broker_kind, database, n_workers = setup
    name = f"{broker_kind}+{database} x{n_workers} N={n}"
    workers: Workers | None = None
    rss: list[PeakRss] = []
    try:
        kill = n_workers > 1 and not args.no_kill
        pkgs = packages(workdir, key, args.model_mib, args.adapter_kib, kill)
        ids = {kind: fleet.client.upload_package(p)["package_id"] for kind, p in pkgs.items()}
        t = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            creds = list(pool.map(fleet.enroll, [f"sim-{i}" for i in range(n)]))
        log(f"{name}: enrolled in {time.monotonic() - t:.1f} s")
        workers = Workers(creds, args.stall_s)
        wait_until(lambda: workers.drain() is not None and workers.count("connected") >= n, timeout=300,
                   what=f"{n} devices connected", interval=0)  # fmt: skip
        if refused := [e for e in workers.events if e[0] == "refused"]:
            raise RuntimeError(f"the broker refused {len(refused)} devices: {refused[:3]}")
        # The broker's process (the first worker's for the embedded broker, which lives in it), then each worker.
        rss = [PeakRss(broker.process.pid if broker is not None and broker.process else fleet.service.pid)]
        rss += [PeakRss(s.pid) for s in fleet.services]
        cpu_before = fleet.cpu_s()
        runs = []
        have: set[str] = set()
        for kind in ("full", "adapter"):
            blobs = blob_sizes(pkgs[kind])
            needed = sum(size for sha, size in blobs.items() if sha not in have)
            have |= set(blobs)
            before = fleet.totals()
            for r in rss:
                r.reset()
            t0 = time.monotonic()
            fleet.client.create_rollout(ids[kind], "all")

            def all_committed(pid: str = ids[kind]) -> bool:
                workers.drain()
                return workers.count("done", "COMMITTED", pid) >= n and fleet.committed(pid) >= n

            wait_until(all_committed, timeout=args.timeout, what=f"{n} devices COMMITTED ({kind})", interval=0.25)
            seconds = time.monotonic() - t0
            after = fleet.totals()
            sent = {k: after[k] - before.get(k, 0) for k in after}
            runs.append(
                {
                    "broker": broker_kind,
                    "database": database,
                    "workers": n_workers,
                    "devices": n,
                    "kind": kind,
                    "seconds_to_all_committed": round(seconds, 2),
                    "egress_bytes": sent["broadcast_bytes"] + sent["repair_bytes"],
                    "blob_bytes": needed,
                    "worker_peak_rss_mb": [round(r.peak_mb, 1) for r in rss[1:]],
                    "broker_peak_rss_mb": round(rss[0].peak_mb, 1),
                }
            )
            log(f"{name} {kind}: {runs[-1]}; transfers {sent}")
        rate = measure_telemetry(fleet, workers, n, args)
        cpu = [round(b - a, 2) for a, b in zip(cpu_before, fleet.cpu_s(), strict=True)]
        ceiling = database_ceiling(fleet, n_workers, args) if fleet.database_url else None
        killed = None
        if kill:
            needed = sum(size for sha, size in blob_sizes(pkgs["killed"]).items() if sha not in have)
            killed = kill_release(fleet, workers, n, ids["killed"], needed, args)
        for run in runs:
            run["telemetry_samples_per_s"] = round(rate, 1)
            run["worker_cpu_s"] = cpu
            if ceiling is not None:
                run["database_alone_samples_per_s"] = ceiling
            if killed is not None:
                run["kill"] = killed
        return runs
    finally:
        for r in rss:
            r.stop()
        if workers is not None:
            workers.stop()


def measure_telemetry(fleet: Fleet, workers: Workers, n: int, args: argparse.Namespace) -> float:
    total = n * args.telemetry_batches * args.telemetry_samples
    before = fleet.telemetry_rows()
    t0 = time.monotonic()
    workers.send("telemetry", args.telemetry_batches, args.telemetry_samples)
    wait_until(lambda: fleet.telemetry_rows() - before >= total, timeout=args.timeout, what=f"{total} samples stored",
               interval=0.1)  # fmt: skip
    rate = total / (time.monotonic() - t0)
    log(f"telemetry: {total} samples from {n} devices stored at {rate:,.0f} samples/s")
    return rate


def database_ceiling(fleet: Fleet, n_workers: int, args: argparse.Namespace) -> dict[str, float]:
    """Samples/s the database stores through the fleet's own write path with one writer process and
    with `n_workers` of them (the workers' share of the devices each), no broker or ingest in between."""
    assert fleet.database_url is not None
    devices = sorted(d["id"] for d in fleet.client.list_devices())
    per_writer = len(devices) * args.telemetry_batches * args.telemetry_samples
    rates: dict[str, float] = {}
    for writers in sorted({1, n_workers}):
        total = per_writer - per_writer % writers
        ctx = multiprocessing.get_context("spawn")
        start = ctx.Barrier(writers + 1)
        base = (1 + len(rates)) * 10**12  # sequence numbers no device of the bench sends
        procs = [
            ctx.Process(
                target=_write_samples, args=(fleet.database_url, devices[i::writers], total // writers, base, start)
            )
            for i in range(writers)
        ]
        for proc in procs:
            proc.start()
        start.wait()
        t0 = time.monotonic()
        for proc in procs:
            proc.join()
        if any(proc.exitcode for proc in procs):
            raise RuntimeError("a database writer failed")
        rates[str(writers)] = round(total / (time.monotonic() - t0), 1)
    log(f"the database alone: {rates} samples/s by number of writer processes")
    return rates


def _write_samples(url: str, devices: list[str], total: int, base: int, start: Any) -> None:
    from slmops_fleet.ingest import Ingest
    from slmops_fleet.store import Store
    from slmops_fleet.store.records import TelemetryRecord

    store = Store(url)
    batch = inspect.signature(Ingest).parameters["telemetry_batch"].default  # the fleet's batch size
    start.wait()
    for first in range(0, total, batch):
        samples = [
            TelemetryRecord(
                devices[i % len(devices)],
                base + i,
                1_700_000_000_000 + i,
                cpu_percent=12.5,
                memory_used_bytes=2**30,
                memory_total_bytes=2**32,
                tokens_per_s=12.0,
                ttft_ms=30.0,
                update_state="COMMITTED",
                active_package_id="bench",
            )
            for i in range(first, min(first + batch, total))
        ]
        store.insert_telemetry(samples)
    store.engine.dispose()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def table(runs: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Table(title="fleet delivery (simulated devices in worker processes)")
    for col in ("broker", "database", "workers", "devices", "kind", "s to all COMMITTED", "egress MiB", "blob MiB",
                "egress/blob", "adapter/full", "telemetry samples/s", "DB alone samples/s (writers)",
                "worker peak RSS MB", "worker CPU s", "broker peak RSS MB"):  # fmt: skip
        out.add_column(col, justify="left" if col in ("broker", "database", "kind") else "right")
    full = {
        (r["broker"], r["database"], r["workers"], r["devices"]): r["egress_bytes"] for r in runs if r["kind"] == "full"
    }
    for r in runs:
        ratio = r["egress_bytes"] / r["blob_bytes"] if r["blob_bytes"] else float("nan")
        setup = (r["broker"], r["database"], r["workers"], r["devices"])
        vs_full = r["egress_bytes"] / full[setup] if r["kind"] == "adapter" else None
        out.add_row(
            r["broker"],
            r["database"],
            str(r["workers"]),
            str(r["devices"]),
            r["kind"],
            f"{r['seconds_to_all_committed']:.1f}",
            f"{r['egress_bytes'] / 2**20:.2f}",
            f"{r['blob_bytes'] / 2**20:.2f}",
            f"{ratio:.2f}",
            f"{vs_full:.1%}" if vs_full is not None else "",
            f"{r['telemetry_samples_per_s']:,.0f}",
            " ".join(f"{v:,.0f} ({k})" for k, v in r.get("database_alone_samples_per_s", {}).items()),
            " ".join(f"{m:.0f}" for m in r["worker_peak_rss_mb"]),
            " ".join(f"{c:.1f}" for c in r["worker_cpu_s"]),
            f"{r['broker_peak_rss_mb']:.0f}",
        )
    Console(width=200).print(out)
    kill_table(runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", default="100,1000", help="Comma-separated fleet sizes.")
    p.add_argument("--brokers", default="mosquitto,embedded", help="mosquitto and/or embedded.")
    p.add_argument("--database", default="sqlite", help="sqlite and/or postgresql (a throwaway database).")
    p.add_argument(
        "--workers",
        default="1",
        help="Comma-separated numbers of fleet workers; more than one needs Mosquitto and PostgreSQL.",
    )
    p.add_argument("--model-mib", type=float, default=4.0, help="Model data in the full package (MiB).")
    p.add_argument("--adapter-kib", type=float, default=160.0, help="Adapter file of the adapter release (KiB).")
    p.add_argument(
        "--stall-s",
        type=float,
        default=5.0,
        help="A device asks for its gaps after this long idle (the agent's default).",
    )
    p.add_argument(
        "--coalesce-s",
        type=float,
        help="The fleet's coalesce_window_s: a broadcast waits this long for the "
        "requests of a wave (default: the fleet's own default).",
    )
    p.add_argument("--telemetry-batches", type=int, default=20, help="TelemetryBatch messages per device.")
    p.add_argument("--telemetry-samples", type=int, default=100, help="Samples per TelemetryBatch.")
    p.add_argument(
        "--no-kill",
        action="store_true",
        help="With several workers, skip the third release whose leading worker is SIGKILLed mid-broadcast.",
    )
    p.add_argument(
        "--kill-samples",
        type=int,
        default=2,
        help="Telemetry samples each device sends per second during the killed release.",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="Seconds a release may take.")
    p.add_argument("--workdir", type=Path, help="Keep the fleets' folders and logs here (default: a temp folder).")
    p.add_argument("--json", type=Path, help="Write the results as JSON to this path.")
    p.add_argument(
        "--fleet-log-level",
        default="WARNING",
        help="The fleet workers' log level (INFO logs each blob request and what the fleet did with it).",
    )
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.devices.split(",") if x]
    brokers = [b for b in args.brokers.split(",") if b]
    databases = [d for d in args.database.split(",") if d]
    counts = [int(x) for x in args.workers.split(",") if x]
    if unknown := set(brokers) - {"mosquitto", "embedded"}:
        p.error(f"unknown broker(s): {', '.join(sorted(unknown))}")
    if unknown := set(databases) - {"sqlite", "postgresql"}:
        p.error(f"unknown database(s): {', '.join(sorted(unknown))}")
    if not counts or min(counts) < 1:
        p.error("--workers takes numbers of 1 or more")
    if args.kill_samples < 1:
        p.error("--kill-samples takes a number of 1 or more")

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        root = args.workdir or Path(tmp)
        for broker in brokers:
            for database in databases:
                for workers in counts:
                    if workers > 1 and (broker == "embedded" or database == "sqlite"):
                        log(f"skipped {broker}+{database} x{workers}: several workers need Mosquitto and PostgreSQL")
                        continue
                    for n in sizes:
                        workdir = root / f"{broker}-{database}-{workers}-{n}-{secrets.token_hex(3)}"
                        workdir.mkdir(parents=True)
                        runs += bench(broker, database, workers, n, args, workdir)
    table(runs)
    if args.json:
        args.json.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

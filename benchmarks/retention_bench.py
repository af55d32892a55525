"""Telemetry retention beside ingest: the fleet's batched sweep against one big DELETE (run by hand).

A store (SQLite in a temporary folder, or `--pg URL`) holds `--devices` devices with `--rows` samples
each; retention keeps `--keep` per device. While it runs, a writer inserts what ingest would (100-sample
batches, one every 10 ms, the fleet's own `insert_telemetry`). For each way, the table shows the rows
dropped, the sweep's time, and the writer's insert latency (p50, p99, max) during the sweep, with the
same writer's latency without any sweep as the baseline.

    python benchmarks/retention_bench.py --devices 4 --rows 250000 --keep 150000 [--pg postgresql+psycopg://...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from slmops_fleet.retention import TelemetryRetention
from slmops_fleet.store import Store
from slmops_fleet.store.records import TelemetryRecord

T0 = 1_765_000_000_000


def fill(store: Store, devices: int, rows: int) -> list[str]:
    ids = []
    for n in range(devices):
        token = store.create_token(60)[0]
        d = store.enroll(token, public_key="ab" * 32, name=f"d{n}", inventory={}, mqtt_password_hash="h").id
        for i in range(0, rows, 5000):
            store.insert_telemetry([TelemetryRecord(d, seq=j, timestamp_ms=T0 + j) for j in range(i, i + 5000)])
        ids.append(d)
    return ids


def while_writing(store: Store, device: str, work: Callable[[], int]) -> dict[str, Any]:
    """Run `work` while a writer inserts 100-sample batches every 10 ms; its latencies meanwhile."""
    latencies: list[float] = []
    stop = threading.Event()
    seq = [10**9 + int(time.monotonic() * 1000) * 1000]

    def writer() -> None:
        while not stop.is_set():
            batch = [TelemetryRecord(device, seq=seq[0] + j, timestamp_ms=T0 * 2 + seq[0] + j) for j in range(100)]
            seq[0] += 100
            start = time.perf_counter()
            store.insert_telemetry(batch)
            latencies.append(time.perf_counter() - start)
            time.sleep(0.01)

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.2)
    start = time.perf_counter()
    dropped = work()
    took = time.perf_counter() - start
    stop.set()
    thread.join()
    ms = sorted(x * 1000 for x in latencies)
    return {
        "dropped": dropped,
        "seconds": round(took, 2),
        "inserts": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(ms[int(len(ms) * 0.99)], 1),
        "max_ms": round(ms[-1], 1),
    }


def idle() -> int:
    time.sleep(2.0)
    return 0


def one_delete(store: Store, ids: list[str], keep: int) -> int:
    """The alternative: each device's excess in one DELETE statement (one transaction)."""
    total = 0
    for d in ids:
        mark = store.telemetry_keep_mark(d, keep)
        total += store.prune_telemetry(d, before_ms=None, through=mark, batch=None) if mark else 0
    return total


def fresh_stores(args: argparse.Namespace, tmp: Path) -> list[tuple[str, Callable[[int], str], Callable[[], None]]]:
    """(database, a fresh URL for run n, clean-up) for SQLite and, with --pg, PostgreSQL (a schema a run)."""
    out: list[tuple[str, Callable[[int], str], Callable[[], None]]] = [
        ("sqlite", lambda n: f"sqlite:///{tmp}/bench-{n}.db", lambda: None)
    ]
    if args.pg:
        import psycopg

        plain = args.pg.replace("postgresql+psycopg://", "postgresql://")
        schemas: list[str] = []

        def pg_url(n: int) -> str:
            schema = f"slmops_retention_bench_{n}"
            with psycopg.connect(plain, autocommit=True) as c:
                c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                c.execute(f'CREATE SCHEMA "{schema}"')
            schemas.append(schema)
            return f"{args.pg}{'&' if '?' in args.pg else '?'}options=-csearch_path%3D{schema}"

        def drop() -> None:
            with psycopg.connect(plain, autocommit=True) as c:
                for schema in schemas:
                    c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

        out.append(("postgresql", pg_url, drop))
    return out


WAYS = ("no sweep (baseline)", "batched sweep (fleet)", "one DELETE per device")


def run(database: str, url_for: Callable[[int], str], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n, way in enumerate(WAYS):
        store = Store(url_for(n))
        store.migrate()
        ids = fill(store, args.devices, args.rows)
        retention = TelemetryRetention(store, max_age_s=0, max_rows_per_device=args.keep, interval_s=60)
        work = {0: idle, 1: retention.sweep, 2: partial(one_delete, store, ids, args.keep)}[n]
        result = while_writing(store, ids[0], work)
        store.close()
        rows.append({"database": database, "way": way, **result})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--rows", type=int, default=250_000, help="samples per device before the sweep")
    parser.add_argument("--keep", type=int, default=150_000, help="samples per device retention keeps")
    parser.add_argument("--pg", help="also on PostgreSQL at this SQLAlchemy URL (a schema per run, dropped)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for database, url_for, clean_up in fresh_stores(args, Path(tmp)):
            try:
                results += run(database, url_for, args)
            finally:
                clean_up()
    head = ("database", "way", "dropped", "sweep s", "inserts", "p50 ms", "p99 ms", "max ms")
    print("{:10} {:24} {:>9} {:>8} {:>8} {:>7} {:>7} {:>7}".format(*head))
    for r in results:
        print(
            "{:10} {:24} {:>9} {:>8} {:>8} {:>7} {:>7} {:>7}".format(
                r["database"], r["way"], r["dropped"], r["seconds"], r["inserts"], r["p50_ms"], r["p99_ms"], r["max_ms"]
            )
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

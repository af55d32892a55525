"""fleet_bench's third release with several workers: the worker leading the rollout SIGKILLed mid-broadcast.

A second full package (new random model bytes, the same size) goes to all devices while each of them
sends a TelemetryBatch of `--kill-samples` samples every second. The worker holding the rollout-driver
lease (the one serving blob requests, found through each worker's /v1/status) is SIGKILLed as soon as
its /v1/stats shows a broadcast that has sent at least one chunk (`chunks_sent_at_kill`: sent/total
of each), or at the first device COMMITTED if none was seen first (`devices_committed_at_kill`). The
bench then waits, through the surviving worker, for every device COMMITTED on the release, stops the
telemetry, and counts the rows stored in PostgreSQL for the samples sent during the release: lost =
sent - distinct (device, seq) stored; duplicated = rows beyond distinct (device, seq) (the schema's
unique (device_id, seq) with ON CONFLICT DO NOTHING keeps a redelivered sample out, so this counts
what got past it). The egress: the fleet's transfer totals over the release; the killed worker's
last /v1/stats, at most 50 ms before the kill, flushed its counters into them (a worker counts each
chunk as it publishes it), so what it published in those last 50 ms is missing: a lower bound.
`killed_worker_sent_bytes` is what that /v1/stats showed of its running broadcasts (part of the totals).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from sqlalchemy import create_engine, text

from slmops_cli.procs import ProcessFailed, wait_until


def kill_release(
    fleet: Any, workers: Any, n: int, package_id: str, blob_bytes: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Roll `package_id` out to the `n` devices of `workers` (fleet_bench's Workers) on `fleet` (its Fleet),
    SIGKILL the leading worker mid-broadcast, and measure what the issue asks of it."""
    base = args.telemetry_batches * args.telemetry_samples  # every device's telemetry seq so far
    sent_before = telemetry_sent(workers)
    before = fleet.totals()
    t0 = time.monotonic()
    fleet.client.create_rollout(package_id, "all")
    leader = wait_until(fleet.leader, timeout=60, what="the worker leading the rollout", interval=0.05)
    ticks, next_tick = 0, t0
    killed: dict[str, Any] = {}
    while True:
        now = time.monotonic()
        if now - t0 > args.timeout:
            raise ProcessFailed(f"not every device COMMITTED on the killed release after {args.timeout:.0f} s")
        if now >= next_tick:
            workers.send("telemetry", 1, args.kill_samples)
            ticks, next_tick = ticks + 1, now + 1.0
        workers.drain(0.05)
        committed = workers.count("done", "COMMITTED", package_id)
        if not killed:
            stats = fleet.clients[leader].stats()  # flushes the leader's counters into the totals it returns
            sending = [j for j in stats["active_transfers"] if j.get("sent")]
            if committed or sending:
                killed = kill(fleet, leader, time.monotonic() - t0, committed, sending, blob_bytes)
        elif committed >= n and fleet.committed(package_id) >= n:
            break
    seconds = time.monotonic() - t0
    samples = ticks * args.kill_samples
    sent = n * samples
    wait_until(lambda: workers.drain() is not None and telemetry_sent(workers) - sent_before >= sent, timeout=60,
               what="the devices' telemetry sent", interval=0)  # fmt: skip
    rows = distinct = 0
    try:
        wait_until(lambda: stored(fleet.database_url, base, base + samples)[1] >= sent, timeout=120,
                   what=f"{sent} samples of the killed release stored", interval=0.5)  # fmt: skip
    except ProcessFailed as exc:
        print(f"{exc}: counted as lost", file=sys.stderr, flush=True)
    rows, distinct = stored(fleet.database_url, base, base + samples)
    after = fleet.totals()
    transfers = {k: after[k] - before.get(k, 0) for k in after}
    result = {
        "seconds_to_all_committed": round(seconds, 2),
        "egress_bytes": transfers["broadcast_bytes"] + transfers["repair_bytes"],
        "blob_bytes": blob_bytes,
        "samples_sent": sent,
        "samples_lost": sent - distinct,
        "samples_duplicated": rows - distinct,
        **killed,
    }
    print(f"killed release: {result}; counted transfers {transfers}", file=sys.stderr, flush=True)
    return result


def kill(
    fleet: Any, leader: int, after_s: float, committed: int, sending: list[Any], blob_bytes: int
) -> dict[str, Any]:
    """SIGKILL worker `leader`, `sending` the broadcasts its /v1/stats showed last; what to report of it."""
    fleet.kill(leader)
    killed = {
        "killed_worker": f"w{leader}",
        "killed_after_s": round(after_s, 2),
        "devices_committed_at_kill": committed,
        "chunks_sent_at_kill": [f"{j['sent']}/{j['chunks']}" for j in sending],
        "killed_worker_sent_bytes": min(blob_bytes, sum(j["sent"] * j["chunk_size"] for j in sending)),
    }
    print(f"SIGKILLed the leading worker: {killed}", file=sys.stderr, flush=True)
    return killed


def telemetry_sent(workers: Any) -> int:
    return sum(int(e[1]) for e in workers.events if e[0] == "telemetry_sent")


def stored(database_url: str, low: int, high: int) -> tuple[int, int]:
    """(rows, distinct (device, seq)) of telemetry_samples with low < seq <= high."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            query = text(
                "SELECT count(*), count(DISTINCT (device_id, seq)) FROM telemetry_samples "
                "WHERE seq > :lo AND seq <= :hi"
            )
            rows, distinct = conn.execute(query, {"lo": low, "hi": high}).one()
    finally:
        engine.dispose()
    return int(rows), int(distinct)


def kill_table(runs: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Table(title="a worker SIGKILLed mid-rollout (a second full release, telemetry flowing)")
    for col in ("broker", "database", "workers", "devices", "killed", "at s", "chunks sent", "committed at kill",
                "s to all COMMITTED", "egress/blob", "samples sent", "lost", "duplicated"):  # fmt: skip
        out.add_column(col, justify="left" if col in ("broker", "database", "killed") else "right")
    seen = set()
    for r in runs:
        k = r.get("kill")
        setup = (r["broker"], r["database"], r["workers"], r["devices"])
        if k is None or setup in seen:
            continue
        seen.add(setup)
        out.add_row(
            *map(str, setup),
            k["killed_worker"],
            f"{k['killed_after_s']:.1f}",
            " ".join(k["chunks_sent_at_kill"]),
            str(k["devices_committed_at_kill"]),
            f"{k['seconds_to_all_committed']:.1f}",
            f"{k['egress_bytes'] / k['blob_bytes']:.2f}",
            f"{k['samples_sent']:,}",
            str(k["samples_lost"]),
            str(k["samples_duplicated"]),
        )
    if seen:
        Console(width=200).print(out)

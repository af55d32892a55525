"""SIGKILL the agent at random points of updates, restart it, check the invariant (run by hand).

One fleet (`slmops fleet serve`, embedded broker, paced broadcast) and one agent (`slmops agent
run`), both real processes. Each trial rolls out a new version (the tiny test model plus a padding
file of a random size, so the download lasts from nothing to a few seconds), waits a random time
between 0 and about one update's duration, and SIGKILLs the agent from outside; the state the agent
was in is read from its persisted `state.json`. The agent is then restarted and must:

- answer every request with the old or the new version (UNAVAILABLE only while it starts up, 30 s at most);
- end in a final state the fleet sees: COMMITTED on the new version, or ROLLED_BACK with a reason
  and the old version still serving;
- serve what the fleet reports as its active version.

Any miss is a violation, listed with the trial. Prints a table (trials, kills per state, outcomes,
violations); `--json PATH` writes it.

    python benchmarks/crash_bench.py --trials 40 --json crash.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from slmops_builder.keys import generate_key, public_path
from slmops_cli.procs import ProcessFailed
from slmops_fleet.client import FleetClient
from slmops_testing.crash import CHUNK, Agent, enroll, padded_package, release, start_fleet
from slmops_testing.processes import FleetProc
from slmops_testing.tiny_model import TINY_NAME, TINY_PROFILE, make_tiny_hf_model

STATES = ("FETCHING", "VERIFYING", "STAGED", "TESTING", "COMMITTED", "ROLLED_BACK")
RATE = 2 * 1024 * 1024  # the fleet's broadcast pace: an 8-chunk padding takes ~1 s


def tiny_package(workdir: Path, key: Path) -> Path:
    """The tests' tiny Llama, converted and packaged like any model (about 20 s, once)."""
    from slmops_builder.build import build_package

    hf = make_tiny_hf_model(workdir / "tiny-hf")
    built = build_package(
        hf, TINY_PROFILE, TINY_NAME, "1.0.0", key, workdir / "tiny", cache_dir=workdir / "cache",
        threads=1,
    )  # fmt: skip
    return Path(built.path)


def device(fleet: FleetProc, device_id: str) -> dict[str, Any]:
    with FleetClient(fleet.info["url"], fleet.info["admin_token"]) as client:
        return client.get_device(device_id)


def record(agent: Agent) -> dict[str, Any]:
    """The agent's persisted update record (state.json)."""
    data: dict[str, Any] = json.loads((agent.state_dir / "state.json").read_text())
    return data


def trial(
    fleet: FleetProc, agent: Agent, tiny: Path, key: Path, work: Path, n: int, old: str, rng: random.Random, span: float
) -> dict[str, Any]:
    new = f"1.{n}.0"
    pad = rng.randint(1, 12) * CHUNK if rng.random() < 0.7 else 1024
    pkg, new_id, _ = padded_package(tiny, work / f"v{n}", key, new, pad)
    delay = rng.uniform(0, span)
    release(fleet, pkg)
    time.sleep(delay)
    agent.kill()
    rec = record(agent)
    at = rec["state"] if rec.get("target_package_id") == new_id else "before the update"
    result: dict[str, Any] = {"trial": n, "delay_s": round(delay, 3), "pad_bytes": pad, "killed_in": at}
    violations: list[str] = []

    agent.start()
    started = time.monotonic()
    served: set[str] = set()
    outcome = ""
    while time.monotonic() - started < 120:
        version = agent.answer()
        served.add(version)
        if version not in ("", old, new):
            violations.append(f"served {version!r} (old {old}, new {new})")
        if not version and time.monotonic() - started > 30:
            violations.append("nothing served 30 s after the restart")
            break
        d = device(fleet, agent.device_id)
        if d["state"] == "COMMITTED" and d["active_package_id"] == new_id:
            outcome = "COMMITTED"
        elif d["state"] == "ROLLED_BACK" and d["target_package_id"] == new_id:
            outcome = "ROLLED_BACK"
        if outcome:
            break
        time.sleep(0.1)
    else:
        violations.append("no final state 120 s after the restart")
    if outcome:
        final = agent.answer()
        while not final and time.monotonic() - started < 30:  # still loading its model after the restart
            time.sleep(0.1)
            final = agent.answer()
        served.add(final)
        d = device(fleet, agent.device_id)
        expected = new if outcome == "COMMITTED" else old
        if final != expected or d["active_version"] != expected:
            violations.append(
                f"{outcome}: serves {final!r}, the fleet says {d['active_version']!r}, expected {expected}"
            )
        if outcome == "ROLLED_BACK" and not d["reason"]:
            violations.append("rolled back without a reason")
        result["reason"] = d["reason"] or ""
    result.update(outcome=outcome or "none", served=sorted(served - {""}), violations=violations)
    return result


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    key = work / "keys" / "bench.key"
    generate_key(key)
    tiny = args.package or tiny_package(work, key)
    fleet = start_fleet(work / "fleet", work / "logs" / "fleet.log", public_path(key), rate=RATE)
    agent = enroll(fleet, work / "agent", work / "logs")
    try:
        agent.start()
        pkg, pid, _ = padded_package(tiny, work / "v0", key, "1.0.0", 1024)
        release(fleet, pkg)
        t0 = time.monotonic()
        while device(fleet, agent.device_id)["active_package_id"] != pid:
            if time.monotonic() - t0 > 120:
                raise ProcessFailed("the first version never committed")
            time.sleep(0.1)
        # One update's duration on the device with the largest padding (rollout to COMMITTED in state.json):
        # kills land anywhere from the rollout to a little after the commit.
        pkg, pid, _ = padded_package(tiny, work / "calibrate", key, "1.0.1", 12 * CHUNK)
        release(fleet, pkg)
        t0 = time.monotonic()
        while not (agent.state() == "COMMITTED" and record(agent)["target_package_id"] == pid):
            time.sleep(0.01)
        span = (time.monotonic() - t0) * 1.1
        while device(fleet, agent.device_id)["active_package_id"] != pid:
            time.sleep(0.05)
        print(f"one update takes {span / 1.1:.1f} s; kills fall in 0..{span:.1f} s", file=sys.stderr)
        old, trials = "1.0.1", []
        for n in range(1, args.trials + 1):
            r = trial(fleet, agent, tiny, key, work, n, old, rng, span)
            trials.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
            if r["outcome"] == "COMMITTED":
                old = f"1.{n}.0"
    finally:
        agent.stop()
        fleet.service.stop()
    kills = Counter(t["killed_in"] for t in trials)
    return {
        "trials": len(trials),
        "kills": {s: kills[s] for s in ("before the update", *STATES) if kills[s]},
        "outcomes": dict(Counter(t["outcome"] for t in trials)),
        "violations": [
            {"trial": t["trial"], "killed_in": t["killed_in"], "what": v} for t in trials for v in t["violations"]
        ],
        "details": trials,
    }


def table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Table(title=f"agent SIGKILLed at random points: {result['trials']} trials")
    out.add_column("killed in")
    for col in ("kills", "COMMITTED", "ROLLED_BACK", "violations"):
        out.add_column(col, justify="right")
    for state, count in result["kills"].items():
        rows = [t for t in result["details"] if t["killed_in"] == state]
        out.add_row(
            state,
            str(count),
            str(sum(t["outcome"] == "COMMITTED" for t in rows)),
            str(sum(t["outcome"] == "ROLLED_BACK" for t in rows)),
            str(sum(len(t["violations"]) for t in rows)),
        )
    console = Console(width=120)
    console.print(out)
    for v in result["violations"]:
        console.print(f"[red]trial {v['trial']} (killed in {v['killed_in']}): {v['what']}")
    if not result["violations"]:
        console.print("no violations: every restart served the old or the new version and ended in the right state")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--package", type=Path, help="A model package folder to use (default: build the tiny test model).")
    p.add_argument("--workdir", type=Path, help="Keep the fleet's and agent's folders and logs here.")
    p.add_argument("--json", type=Path, help="Write the results as JSON to this path.")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="crash-bench-", dir="/tmp") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, work)
    table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["violations"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Desired states published by any of several fleet workers, the newest retained last.

Each worker publishes the desired states it changed (the rollout driver's holder, an operator's
command on any worker, a worker's republish when its MQTT session connects), after the database
numbered them. Two workers may publish two generations of one device at about the same time, and
the broker retains whichever came last: the older one, sometimes. So a worker waits until the
broker acknowledged what it published, reads the newest generation of those devices again, and
publishes the newer ones it finds; whatever the interleaving, the last publish of each device is
then its newest desired state (a newer one was committed before it was published, so the check
after an older publish sees it). A device also keeps only the highest generation it has seen.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from slmops_fleet.distribution import PublishHandle
from slmops_fleet.store.records import DesiredRecord

log = logging.getLogger(__name__)

QUERY_BATCH = 1000  # devices per query for their newest desired states


def publish_newest_last(
    records: Sequence[DesiredRecord],
    publish: Callable[[DesiredRecord], PublishHandle],
    latest: Callable[[list[str]], list[DesiredRecord]],
    *,
    ack_timeout_s: float = 10.0,
    rounds: int = 3,
) -> int:
    """Publish `records`, then again any newer desired state of their devices, until none is newer
    (at most `rounds` times); returns the newer ones published. When the broker does not acknowledge
    in time it stops: the fleet republishes every newest desired state when its session connects."""
    pending = list(records)
    again = 0
    for _ in range(rounds):
        if not pending:
            break
        handles = [publish(d) for d in pending]
        deadline = time.monotonic() + ack_timeout_s
        if not all(h.wait(max(0.0, deadline - time.monotonic())) for h in handles):
            log.warning(
                "desired states not acknowledged in %.0f s; they go again when the fleet reconnects", ack_timeout_s
            )
            break
        sent = {d.device_id: d.generation for d in pending}
        ids = sorted(sent)
        newest = [r for i in range(0, len(ids), QUERY_BATCH) for r in latest(ids[i : i + QUERY_BATCH])]
        pending = [r for r in newest if r.generation > sent[r.device_id]]
        if pending:
            again += len(pending)
            log.info("%d devices have a newer desired state than this worker published: publishing it", len(pending))
    return again

"""The fleet's store: SQLAlchemy 2 rows, Alembic migrations applied at start, and the transactions
the rest of the fleet needs (each returns plain dataclasses, `records`, never ORM objects).

- `database`: the engine and one transaction per call (SQLite or PostgreSQL).
- `schema`: the rows; `records`: what the store hands out.
- `groups`, `targeting`: named device groups, and the releases assigned to them that keep applying
  to the devices that join (continuous targeting).
- `devices`, `lifecycle`, `packages`, `blobs`, `broadcasts`, `leases`, `rollouts`, `rollback`, `telemetry`, `metrics`,
  `admin`, `keys`: the queries of each entity (`lifecycle`: revocation and credential rotation;
  `admin`: admin tokens, audit log; `keys`: key statements; `rollback`: a rollout returning another's
  devices; `broadcasts`: the broadcast chunks workers share; `metrics`: what `/metrics` reads);
  the rollout rules themselves live in `slmops_fleet.rollouts.rules`.
- `Store`: all of them on one object.
"""

from slmops_fleet.store.admin import AdminQueries
from slmops_fleet.store.blobs import BlobQueries
from slmops_fleet.store.broadcasts import BroadcastQueries
from slmops_fleet.store.devices import DeviceQueries
from slmops_fleet.store.keys import KeyStatementQueries
from slmops_fleet.store.leases import LeaseQueries
from slmops_fleet.store.lifecycle import LifecycleQueries
from slmops_fleet.store.metrics import MetricsQueries
from slmops_fleet.store.packages import PackageQueries
from slmops_fleet.store.rollback import RollbackQueries
from slmops_fleet.store.targeting import TargetingQueries
from slmops_fleet.store.telemetry import TelemetryQueries

__all__ = ["Store"]


class Store(
    TargetingQueries,
    DeviceQueries,
    LifecycleQueries,
    PackageQueries,
    BlobQueries,
    BroadcastQueries,
    LeaseQueries,
    RollbackQueries,
    TelemetryQueries,
    MetricsQueries,
    AdminQueries,
    KeyStatementQueries,
):
    """Thread-safe access to the fleet database (one short session per call)."""

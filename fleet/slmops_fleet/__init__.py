"""slmops fleet: the fleet manager (HTTP API, MQTT broker or client, database, blob delivery).

Public API for other components and tests:
- `FleetSettings`: the one settings object (env prefix SLMOPS_FLEET_).
- `FleetServer`: the whole fleet in the caller's event loop (`await start()`, `await stop()`).
- `FleetThread`: the same in a background thread (tests, the demo): `with FleetThread(settings) as f: f.url`.
- `FleetClient`: the HTTP client the CLI uses.
"""

__all__ = ["FleetClient", "FleetServer", "FleetSettings", "FleetThread", "__version__"]
from slmops_protos import __version__


def __getattr__(name: str) -> object:
    # Lazy: `slmops fleet --help` must not import FastAPI, SQLAlchemy or amqtt.
    if name == "FleetSettings":
        from slmops_fleet.settings import FleetSettings

        return FleetSettings
    if name in ("FleetServer", "FleetThread"):
        from slmops_fleet import process

        return getattr(process, name)
    if name == "FleetClient":
        from slmops_fleet.client import FleetClient

        return FleetClient
    raise AttributeError(f"module 'slmops_fleet' has no attribute {name!r}")

"""Alembic migrations of the fleet store (applied by slmops_fleet.store.Store.migrate)."""

"""Alembic migrations of the fleet store (applied by slmops_fleet.db.Store.migrate)."""

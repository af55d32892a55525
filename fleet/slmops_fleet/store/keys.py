"""The key statements the fleet applied (package-signing key rotation), in sequence order."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from slmops_fleet.errors import Conflict
from slmops_fleet.store.database import Database, utcnow
from slmops_fleet.store.schema import KeyStatementRow


class KeyStatementQueries(Database):
    def key_statements(self) -> list[bytes]:
        """Every applied statement's bytes, oldest first."""
        with self.session() as s:
            return [bytes(b) for b in s.scalars(select(KeyStatementRow.statement).order_by(KeyStatementRow.sequence))]

    def add_key_statement(self, sequence: int, statement: bytes, signed_by: str) -> None:
        """Record a statement the caller checked against every statement before it; Conflict when a
        statement with this or a later sequence was recorded meanwhile (another fleet process)."""
        try:
            with self.session(write=True) as s:
                last = s.scalar(select(func.max(KeyStatementRow.sequence)))
                if last is not None and last >= sequence:
                    raise Conflict(f"key statement {sequence} is a replay: statement {last} is already applied")
                s.add(KeyStatementRow(sequence=sequence, statement=statement, signed_by=signed_by, applied_at=utcnow()))
        except IntegrityError:
            raise Conflict(f"key statement {sequence} is already applied") from None

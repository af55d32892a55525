"""The record of broadcast chunks that workers share (`broadcast_record`): one row per (blob,
chunk size, chunk index), with when the broker last acknowledged its broadcast."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from slmops_fleet.store.database import Database
from slmops_fleet.store.schema import BroadcastChunkRow

ChunkSent = tuple[str, int, int, datetime]  # (blob sha256, chunk size, chunk index, acknowledged at)


class BroadcastQueries(Database):
    def add_broadcast_chunks(self, chunks: Sequence[ChunkSent]) -> None:
        """Record broadcast chunks (one statement; a chunk's newest time wins)."""
        newest: dict[tuple[str, int, int], datetime] = {}
        for sha, cs, index, at in chunks:
            key = (sha, cs, index)
            newest[key] = max(at, newest.get(key, at))
        if not newest:
            return
        dialect: Any = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        rows = [{"sha256": k[0], "chunk_size": k[1], "chunk_index": k[2], "acked_at": at} for k, at in newest.items()]
        stmt = dialect.insert(BroadcastChunkRow).values(rows)
        stmt = stmt.on_conflict_do_update(
            index_elements=["sha256", "chunk_size", "chunk_index"], set_={"acked_at": stmt.excluded.acked_at}
        )
        with self.session(write=True) as s:
            s.execute(stmt)

    def broadcast_chunks_since(self, sha256: str, chunk_size: int, since: datetime) -> dict[int, datetime]:
        """The chunks of the blob (at the chunk size) broadcast at `since` or later, and when."""
        with self.session() as s:
            rows = s.execute(
                select(BroadcastChunkRow.chunk_index, BroadcastChunkRow.acked_at).where(
                    BroadcastChunkRow.sha256 == sha256,
                    BroadcastChunkRow.chunk_size == chunk_size,
                    BroadcastChunkRow.acked_at >= since,
                )
            )
            return {index: at for index, at in rows}

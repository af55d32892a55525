"""Blobs every fleet worker reaches: PostgreSQL large objects, each worker's data folder a cache.

An upload is written and checked in the local folder first (`blobstore.BlobWriter`), then streamed
into a new large object in pieces of `PIECE` bytes; the database records `pg-lo:<oid>` as the blob's
location. When two workers take the same upload at once, the first record wins and the other's
large object is unlinked, so a blob lands once. A worker that must send a blob it lacks streams it
from its large object into the cache (piece by piece, hashed as it comes, renamed into place only
when the SHA-256 and size are right): the blob sender reads local files only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
from pathlib import Path

from sqlalchemy.engine import Engine

from slmops_fleet.blobstore import BlobStore, BlobWriter
from slmops_fleet.store.records import BlobRecord

log = logging.getLogger(__name__)

SCHEME = "pg-lo:"
PIECE = 1024 * 1024


def large_object(location: str) -> int | None:
    """The large object's oid of a recorded location, None for a location in the data folder."""
    if not location.startswith(SCHEME):
        return None
    oid = location[len(SCHEME) :]
    return int(oid) if oid.isdigit() else None


class PostgresBlobStore(BlobStore):
    """Blobs in PostgreSQL large objects (the fleet's database), cached in `root`."""

    def __init__(self, root: Path, engine: Engine, data_dir: Path | None = None) -> None:
        super().__init__(root, data_dir)
        if engine.dialect.name != "postgresql":
            raise ValueError(f"the database blob store needs PostgreSQL, not {engine.dialect.name}")
        self.engine = engine
        self._fetching = threading.Lock()  # one cache fill at a time

    def keep(self, writer: BlobWriter) -> str:
        path = self.path(writer.sha256)
        with self.engine.begin() as conn, path.open("rb") as f:
            oid = int(conn.exec_driver_sql("SELECT lo_create(0)").scalar_one())
            offset = 0
            while piece := f.read(PIECE):
                conn.exec_driver_sql("SELECT lo_put(%s, %s, %s)", (oid, offset, piece))
                offset += len(piece)
        log.info("blob %s: %d bytes into large object %d", writer.sha256[:12], offset, oid)
        return f"{SCHEME}{oid}"

    def discard(self, location: str) -> None:
        oid = large_object(location)
        if oid is not None:
            with self.engine.begin() as conn:
                conn.exec_driver_sql("SELECT lo_unlink(%s)", (oid,))

    def holds(self, rec: BlobRecord) -> bool:
        return large_object(rec.path) is not None or super().holds(rec)

    def local_path(self, rec: BlobRecord) -> Path:
        return self.path(rec.sha256) if large_object(rec.path) is not None else super().local_path(rec)

    def ensure_local(self, rec: BlobRecord) -> bool:
        oid = large_object(rec.path)
        if oid is None:
            return super().ensure_local(rec)
        final = self.path(rec.sha256)
        if final.is_file() and final.stat().st_size == rec.size:
            return True
        with self._fetching:
            if final.is_file() and final.stat().st_size == rec.size:
                return True
            return self._fetch(oid, rec)

    def _fetch(self, oid: int, rec: BlobRecord) -> bool:
        self.create()
        tmp = self.incoming / f"{rec.sha256}.{secrets.token_hex(4)}.part"
        digest = hashlib.sha256()
        size = 0
        try:
            with self.engine.connect() as conn, tmp.open("wb") as f:
                while size < rec.size:
                    piece = conn.exec_driver_sql("SELECT lo_get(%s, %s, %s)", (oid, size, PIECE)).scalar_one()
                    if not piece:
                        break
                    digest.update(piece)
                    f.write(piece)
                    size += len(piece)
                f.flush()
                os.fsync(f.fileno())
            if size != rec.size or digest.hexdigest() != rec.sha256:
                log.error(
                    "blob %s in large object %d is %d bytes hashing to %s: not the recorded blob; not cached",
                    rec.sha256[:12], oid, size, digest.hexdigest()[:12],
                )  # fmt: skip
                return False
            os.replace(tmp, self.path(rec.sha256))
            log.info("blob %s: cached from large object %d (%d bytes)", rec.sha256[:12], oid, size)
            return True
        except Exception:
            log.exception("could not read blob %s from large object %d", rec.sha256[:12], oid)
            return False
        finally:
            tmp.unlink(missing_ok=True)

"""Blob files under <data dir>/blobs/: written through a temporary file, hashed while written,
renamed into place only when the SHA-256 and the size are right.

`BlobStore` is also the interface of the fleet's blob backends: where a committed upload is kept
(`keep`, giving the location the database records), whether a recorded blob is there (`holds`),
and the local file the blob sender reads (`ensure_local`, `local_path`). This one keeps blobs in
the data folder only (one worker, or workers sharing the folder); `shared_blobs` keeps them in the
database for every worker, with this folder as each worker's cache.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO

from slmops_fleet.errors import InvalidRequest, TooLarge
from slmops_fleet.store.records import BlobRecord
from slmops_protos.manifests import is_sha256_hex


class BlobWriter:
    """Receives one blob's bytes; `commit()` checks them and moves the file into the store."""

    def __init__(self, store: BlobStore, sha256: str, expected_size: int) -> None:
        self.store = store
        self.sha256 = sha256
        self.expected_size = expected_size
        self.size = 0
        self._hash = hashlib.sha256()
        self.tmp = store.incoming / f"{sha256}.{secrets.token_hex(4)}.part"
        self._file: BinaryIO | None = self.tmp.open("wb")

    def write(self, data: bytes) -> None:
        if self._file is None:
            raise RuntimeError("blob writer is closed")
        self.size += len(data)
        if self.size > self.expected_size:
            self.abort()
            raise TooLarge(
                f"blob {self.sha256} is larger than the {self.expected_size} bytes its manifest gives; nothing kept"
            )
        self._hash.update(data)
        self._file.write(data)

    def commit(self) -> Path:
        if self._file is None:
            raise RuntimeError("blob writer is closed")
        if self.size != self.expected_size:
            self.abort()
            raise InvalidRequest(
                f"blob {self.sha256} is {self.size} bytes but its manifest gives {self.expected_size}; nothing kept"
            )
        digest = self._hash.hexdigest()
        if digest != self.sha256:
            self.abort()
            raise InvalidRequest(f"content hash mismatch: the body hashes to {digest}, not {self.sha256}; nothing kept")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        final = self.store.path(self.sha256)
        os.replace(self.tmp, final)
        return final

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.tmp.unlink(missing_ok=True)


class BlobStore:
    def __init__(self, root: Path, data_dir: Path | None = None) -> None:
        self.root = root
        self.data_dir = data_dir or root.parent  # recorded locations are relative to it
        self.incoming = root / ".incoming"

    def create(self) -> None:
        self.incoming.mkdir(parents=True, exist_ok=True)
        for stale in self.incoming.glob("*.part"):  # an upload cut off by a crash
            stale.unlink(missing_ok=True)

    def path(self, sha256: str) -> Path:
        if not is_sha256_hex(sha256):
            raise InvalidRequest(f"not a lowercase hex SHA-256: {sha256[:80]!r}")
        return self.root / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def writer(self, sha256: str, expected_size: int) -> BlobWriter:
        self.path(sha256)  # validates the name
        return BlobWriter(self, sha256, expected_size)

    def relpath(self, sha256: str, data_dir: Path) -> str:
        return self.path(sha256).relative_to(data_dir).as_posix()

    # --- the backend interface ------------------------------------------------------------------

    def keep(self, writer: BlobWriter) -> str:
        """Keep a committed upload; the location to record for it."""
        return self.relpath(writer.sha256, self.data_dir)

    def discard(self, location: str) -> None:
        """Drop what `keep` made when another upload of the same blob was recorded first."""

    def holds(self, rec: BlobRecord) -> bool:
        """Whether the recorded blob can be read."""
        return (self.data_dir / rec.path).is_file()

    def ensure_local(self, rec: BlobRecord) -> bool:
        """Make the recorded blob's local file ready to read (a cache may fetch it); False if it cannot."""
        return self.holds(rec)

    def local_path(self, rec: BlobRecord) -> Path:
        return self.data_dir / rec.path

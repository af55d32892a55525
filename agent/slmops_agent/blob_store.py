"""The content-addressed blob store, with resumable chunked downloads.

    blobs/<sha256>           a verified blob (read-only)
    blobs/<sha256>.partial   a download in progress, preallocated to the blob's size
    blobs/<sha256>.bitmap    which chunks of the partial file are written and durable

A chunk's bit reaches the bitmap file only after the partial file has been fsynced, so after
a crash the bitmap may miss chunks that were written (they are fetched again) but never
claims one that was not. Bitmaps are flushed at most every `flush_interval_s` and on close.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from slmops_agent.errors import BlobError
from slmops_agent.layout import fsync_dir, write_atomic
from slmops_protos.manifests import is_sha256_hex, sha256_file
from slmops_protos.topics import chunk_count

log = logging.getLogger(__name__)

BITMAP_VERSION = 1


class InsufficientSpace(BlobError):
    """Not enough free disk for what an update must fetch."""


@dataclass(frozen=True)
class Chunk:
    """One numbered piece of a blob, as it arrived (translated from BlobChunk by `codec.chunk_from_pb`)."""

    blob_sha256: str
    index: int
    count: int
    blob_size: int
    chunk_size: int
    chunk_sha256: str
    data: bytes


class Download:
    """A blob being fetched: the preallocated partial file and its chunk bitmap."""

    def __init__(
        self, store: BlobStore, sha256: str, size: int, chunk_size: int, bits: bytearray | None = None
    ) -> None:
        self.store = store
        self.sha256 = sha256
        self.size = size
        self.chunk_size = chunk_size
        self.count = chunk_count(size, chunk_size)
        self._bits = bits if bits is not None else bytearray((self.count + 7) // 8)
        self.received = sum(bin(b).count("1") for b in self._bits)
        self._fd: int | None = None
        self._dirty = False
        self._last_flush = time.monotonic()
        self.flushes = 0

    # -- bitmap ------------------------------------------------------------------------------
    def has(self, index: int) -> bool:
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def missing(self, limit: int | None = None) -> list[int]:
        out: list[int] = []
        for i in range(self.count):
            if not self.has(i):
                out.append(i)
                if limit is not None and len(out) >= limit:
                    break
        return out

    @property
    def complete(self) -> bool:
        return self.received == self.count

    @property
    def bytes_received(self) -> int:
        if self.complete:
            return self.size
        n = self.received * self.chunk_size
        if self.has(self.count - 1):
            n -= self.chunk_size - self._chunk_len(self.count - 1)
        return n

    def _chunk_len(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    # -- data --------------------------------------------------------------------------------
    def open(self) -> int:
        if self._fd is None:
            path = self.store.partial_path(self.sha256)
            fresh = not path.exists()
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            if fresh or os.fstat(self._fd).st_size != self.size:
                try:
                    os.posix_fallocate(self._fd, 0, max(1, self.size))
                except OSError:  # filesystems without fallocate: a sparse file of the right size
                    os.ftruncate(self._fd, self.size)
                os.ftruncate(self._fd, self.size)
        return self._fd

    def write_chunk(self, chunk: Chunk) -> bool:
        """Check and write one chunk. True if it was new; False for a duplicate. BlobError if bad."""
        if chunk.blob_sha256 != self.sha256:
            raise BlobError(f"chunk of {chunk.blob_sha256[:12]} offered to download of {self.sha256[:12]}")
        if chunk.blob_size != self.size:
            raise BlobError(f"chunk says blob {self.sha256[:12]} is {chunk.blob_size} bytes, expected {self.size}")
        if chunk.chunk_size != self.chunk_size or chunk.count != self.count:
            raise BlobError(
                f"chunk of {self.sha256[:12]} uses chunk size {chunk.chunk_size} ({chunk.count} chunks); "
                f"this download uses {self.chunk_size} ({self.count})"
            )
        if not 0 <= chunk.index < self.count:
            raise BlobError(f"chunk index {chunk.index} out of range 0..{self.count - 1}")
        if len(chunk.data) != self._chunk_len(chunk.index):
            raise BlobError(
                f"chunk {chunk.index} of {self.sha256[:12]} is {len(chunk.data)} bytes, "
                f"expected {self._chunk_len(chunk.index)}"
            )
        if hashlib.sha256(chunk.data).hexdigest() != chunk.chunk_sha256:
            raise BlobError(f"chunk {chunk.index} of {self.sha256[:12]} fails its SHA-256 check")
        if self.has(chunk.index):
            return False
        fd = self.open()
        offset = chunk.index * self.chunk_size
        view = memoryview(chunk.data)
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written
        self._bits[chunk.index >> 3] |= 1 << (chunk.index & 7)
        self.received += 1
        self._dirty = True
        self.flush(force=False)
        return True

    def flush(self, force: bool = True) -> None:
        """Make the written chunks durable, then the bitmap that names them (rate-bounded unless forced)."""
        if not self._dirty:
            return
        now = time.monotonic()
        if not force and now - self._last_flush < self.store.flush_interval_s:
            return
        if self._fd is not None:
            os.fsync(self._fd)
        header = {
            "v": BITMAP_VERSION,
            "sha256": self.sha256,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "count": self.count,
        }
        write_atomic(
            self.store.bitmap_path(self.sha256),
            json.dumps(header).encode() + b"\n" + bytes(self._bits),
            mode=0o600,
        )
        self._dirty = False
        self._last_flush = now
        self.flushes += 1

    def close(self) -> None:
        self.flush(force=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class BlobStore:
    def __init__(self, root: Path, *, flush_interval_s: float = 1.0) -> None:
        self.root = root
        self.flush_interval_s = flush_interval_s
        root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not is_sha256_hex(sha256):
            raise BlobError(f"not a sha256: {sha256!r}")
        return self.root / sha256

    def partial_path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.partial"

    def bitmap_path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.bitmap"

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, needed: int, reserve: int) -> None:
        free = self.free_bytes()
        if needed + reserve > free:
            raise InsufficientSpace(
                f"not enough disk: the update needs {needed} bytes (+{reserve} reserve), {free} free"
            )

    def bytes_to_fetch(self, blobs: dict[str, int]) -> int:
        """Disk the given blobs (sha -> size) still need: absent ones, less what partial files already hold."""
        need = 0
        for sha, size in blobs.items():
            if self.has(sha):
                continue
            if not self.partial_path(sha).exists():
                need += size
        return need

    def open_download(self, sha256: str, size: int, chunk_size: int) -> Download:
        """Resume the download of `sha256` if its bitmap matches (size, chunk size); start afresh otherwise."""
        if chunk_size <= 0:
            raise BlobError(f"chunk size must be positive, got {chunk_size}")
        self.path(sha256)  # validates the name
        bitmap = self.bitmap_path(sha256)
        partial = self.partial_path(sha256)
        if bitmap.exists() and partial.exists():
            try:
                raw = bitmap.read_bytes()
                head, _, bits = raw.partition(b"\n")
                header = json.loads(head)
                if (
                    header.get("v") == BITMAP_VERSION
                    and header.get("sha256") == sha256
                    and header.get("size") == size
                    and header.get("chunk_size") == chunk_size
                    and len(bits) == (chunk_count(size, chunk_size) + 7) // 8
                    and partial.stat().st_size == size
                ):
                    return Download(self, sha256, size, chunk_size, bytearray(bits))
                log.info("download of %s restarts: its bitmap is for another size or chunk size", sha256[:12])
            except (OSError, ValueError) as exc:
                log.warning("download of %s restarts: unreadable bitmap (%s)", sha256[:12], exc)
        self.discard(sha256)
        download = Download(self, sha256, size, chunk_size)
        download.open()  # preallocate now: the space is claimed before any chunk arrives
        return download

    def finish(self, download: Download) -> Path:
        """Check the whole blob's SHA-256 and move it into the store. On a mismatch the partial
        file and bitmap are deleted (so the blob is fetched again) and BlobError is raised."""
        if not download.complete:
            raise BlobError(f"blob {download.sha256[:12]} is not complete")
        download.close()
        partial = self.partial_path(download.sha256)
        actual = sha256_file(partial)
        if actual != download.sha256:
            self.discard(download.sha256)
            raise BlobError(f"blob {download.sha256[:12]} fails its SHA-256 check (got {actual[:12]})")
        final = self.path(download.sha256)
        os.chmod(partial, 0o444)
        os.replace(partial, final)
        fsync_dir(self.root)
        self.bitmap_path(download.sha256).unlink(missing_ok=True)
        return final

    def import_file(self, src: Path, sha256: str, size: int) -> Path:
        """Copy a local file into the store (a side-loaded package), checking size and SHA-256."""
        final = self.path(sha256)
        if final.is_file():
            return final
        if src.stat().st_size != size:
            raise BlobError(f"{src.name} is {src.stat().st_size} bytes, the manifest says {size}")
        tmp = self.partial_path(sha256)
        h = hashlib.sha256()
        with src.open("rb") as fin, tmp.open("wb") as fout:
            while data := fin.read(1 << 20):
                h.update(data)
                fout.write(data)
            fout.flush()
            os.fsync(fout.fileno())
        if h.hexdigest() != sha256:
            tmp.unlink(missing_ok=True)
            raise BlobError(f"blob {sha256[:12]} fails its SHA-256 check (got {h.hexdigest()[:12]})")
        os.chmod(tmp, 0o444)
        os.replace(tmp, final)
        fsync_dir(self.root)
        return final

    def verify(self, sha256: str, size: int) -> str | None:
        """Re-hash a stored blob; return why it is bad, or None."""
        path = self.path(sha256)
        try:
            actual_size = path.stat().st_size
        except FileNotFoundError:
            return f"blob {sha256[:12]} is missing"
        if actual_size != size:
            return f"blob {sha256[:12]} is {actual_size} bytes, expected {size}"
        actual = sha256_file(path)
        if actual != sha256:
            return f"blob {sha256[:12]} fails its SHA-256 check (got {actual[:12]})"
        return None

    def discard(self, sha256: str) -> None:
        """Forget a download in progress."""
        self.partial_path(sha256).unlink(missing_ok=True)
        self.bitmap_path(sha256).unlink(missing_ok=True)

    def remove(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)
        self.discard(sha256)

    def gc(self, keep: set[str]) -> int:
        """Delete blobs and downloads not named in `keep`; return the bytes freed."""
        freed = 0
        for entry in self.root.iterdir():
            sha = entry.name.split(".", 1)[0]
            if sha in keep or not is_sha256_hex(sha) or entry.name.startswith("."):
                continue
            try:
                freed += entry.stat().st_size
                entry.unlink()
            except FileNotFoundError:
                pass
        return freed

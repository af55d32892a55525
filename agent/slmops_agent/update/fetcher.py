"""FETCHING: the blobs a package needs, asked of the fleet in chunks and repaired. A blob that stalls
is asked again for its missing chunks, with a back-off; a blob that fails its SHA-256 check is
fetched again, up to `blob_verify_attempts` times."""

from __future__ import annotations

import collections
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from slmops_agent.blob_store import BlobStore, Chunk, Download
from slmops_agent.errors import BlobError
from slmops_agent.settings import AgentSettings
from slmops_agent.update.messages import BlobWant
from slmops_protos.topics import chunk_count

log = logging.getLogger(__name__)


class FetchFailed(Exception):
    """A blob cannot be fetched: the update must roll back (`reason` says why)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ChunkOutcome(enum.Enum):
    NOTHING = "nothing"  # not wanted, a duplicate or bad; or a blob is done and others are not
    PROGRESS = "progress"  # a new chunk of a blob still in progress
    COMPLETE = "complete"  # the last blob is in: every blob of the package is in the store


@dataclass
class _Fetch:
    download: Download
    last_progress: float
    last_request: float = float("-inf")
    backoff: float = 5.0
    failures: int = 0
    outstanding: set[int] = field(default_factory=set)  # chunk indexes asked for in the last repair request
    suspect: bool = False  # since the last request: a reconnect or a bad chunk (what it lacks may be lost)


class BlobFetcher:
    """The downloads of one package's missing blobs, and the requests that ask for their chunks."""

    def __init__(
        self,
        store: BlobStore,
        settings: AgentSettings,
        *,
        on_blob_request: Callable[[BlobWant], None] | None,
        is_connected: Callable[[], bool],
    ) -> None:
        self.store = store
        self.settings = settings
        self.on_blob_request = on_blob_request
        self.is_connected = is_connected
        self.fetches: dict[str, _Fetch] = {}
        self.wanted: frozenset[str] = frozenset()
        self.bytes_needed = 0
        self.bad_chunks = 0
        self.requests_sent: collections.deque[BlobWant] = collections.deque(maxlen=1024)
        self._chunk_gap = 0.0  # the longest recent gap between new chunks of the download (s)
        self._last_chunk: float | None = None
        self._describe: Callable[[str], str] = lambda sha: sha[:12]

    @property
    def bytes_received(self) -> int:
        return self.bytes_needed - sum(f.download.size - f.download.bytes_received for f in self.fetches.values())

    def open(self, blobs: dict[str, int], chunk_size: int, describe: Callable[[str], str]) -> None:
        """Start downloading the blobs (sha -> size) the store lacks and ask for them; `describe`
        names a blob in messages."""
        now = time.monotonic()
        self._describe = describe
        self.fetches = {}
        for sha, size in blobs.items():
            if self.store.has(sha):
                continue
            download = self.store.open_download(sha, size, chunk_size)
            self.fetches[sha] = _Fetch(download, last_progress=now, backoff=self.settings.blob_stall_s)
        self._chunk_gap, self._last_chunk = 0.0, None
        self.bytes_needed = sum(f.download.size for f in self.fetches.values())
        self.wanted = frozenset(self.fetches)
        for sha, f in self.fetches.items():
            self._request(sha, f, time.monotonic())

    def close(self) -> None:
        """Flush the downloads' bitmaps and close their files (their partial files stay)."""
        for f in self.fetches.values():
            try:
                f.download.close()
            except OSError as exc:
                log.warning("could not flush a download: %s", exc)

    def clear(self) -> None:
        """Close the downloads and forget them."""
        self.close()
        self.fetches = {}
        self.wanted = frozenset()

    def reconnected(self) -> None:
        """The broker is back: ask again at once for what is missing (what was on its way may be lost)."""
        for f in self.fetches.values():
            f.last_request = float("-inf")
            f.suspect = True

    def _request(self, sha: str, f: _Fetch, now: float, *, waiting: bool = False) -> None:
        """Ask for the blob's missing chunks; `waiting`: after a stall only (BlobRequest.waiting)."""
        d = f.download
        if d.received == 0:
            want = BlobWant(sha, (), d.chunk_size, waiting)
            f.outstanding = set()
        else:
            missing = tuple(d.missing(self.settings.blob_request_max_chunks))
            want = BlobWant(sha, missing, d.chunk_size, waiting)
            f.outstanding = set(missing)
        f.last_request = now
        f.suspect = False
        self.requests_sent.append(want)
        if self.on_blob_request is not None and self.is_connected():
            try:
                self.on_blob_request(want)
            except Exception:
                log.exception("could not send a blob request")

    def on_chunk(self, chunk: Chunk) -> ChunkOutcome:
        """Write a chunk; FetchFailed when its blob failed its check too many times."""
        f = self.fetches.get(chunk.blob_sha256)
        if f is None:
            return ChunkOutcome.NOTHING
        if chunk.chunk_size != f.download.chunk_size:
            self._follow_chunk_size(f, chunk)
        try:
            new = f.download.write_chunk(chunk)
        except BlobError as exc:
            self.bad_chunks += 1
            f.suspect = True
            log.debug("chunk dropped: %s", exc)
            return ChunkOutcome.NOTHING
        if not new:
            return ChunkOutcome.NOTHING
        now = time.monotonic()
        self._note_gap(now)
        for other in self.fetches.values():  # chunks of the package are flowing: none of its blobs is stalled
            other.last_progress = now
        f.backoff = self.settings.blob_stall_s
        repairing = bool(f.outstanding)
        f.outstanding.discard(chunk.index)
        if f.download.complete:
            return self._finish_blob(chunk.blob_sha256, f)
        if repairing and not f.outstanding and self.is_connected():
            self._request(chunk.blob_sha256, f, now)  # the repair batch is in: ask for the next one at once
        return ChunkOutcome.PROGRESS

    def _follow_chunk_size(self, f: _Fetch, chunk: Chunk) -> None:
        """The fleet sends every chunk in its own chunk size, whatever a request names. A download opened
        at another one (the desired state that started it came before the fleet's chunk size changed)
        could never complete: it starts again at the fleet's. A chunk that contradicts the blob's size
        is left to `write_chunk` to refuse."""
        d = f.download
        if chunk.blob_size != d.size or chunk.chunk_size <= 0 or chunk.count != chunk_count(d.size, chunk.chunk_size):
            return
        log.warning(
            "%s: the fleet sends %d-byte chunks, this download asked for %d-byte ones: starting it again",
            self._describe(d.sha256), chunk.chunk_size, d.chunk_size,
        )  # fmt: skip
        d.close()
        f.download = self.store.open_download(d.sha256, d.size, chunk.chunk_size)
        f.outstanding = set()

    def _note_gap(self, now: float) -> None:
        """Follow the longest recent gap between chunks (a peak that fades by a tenth per chunk; a gap
        counts up to the longest stall wait): chunks of several blobs come in bursts."""
        last, self._last_chunk = self._last_chunk, now
        if last is not None:
            self._chunk_gap = max(min(now - last, self.settings.blob_stall_max_s), 0.9 * self._chunk_gap)

    def _finish_blob(self, sha: str, f: _Fetch) -> ChunkOutcome:
        try:
            self.store.finish(f.download)
        except BlobError as exc:
            f.failures += 1
            path = self._describe(sha)
            if f.failures >= self.settings.blob_verify_attempts:
                raise FetchFailed(
                    f"{path}: {exc} ({f.failures} times); the package's content does not match it"
                ) from exc
            log.warning("%s: %s; fetching it again", path, exc)
            f.download = self.store.open_download(sha, f.download.size, f.download.chunk_size)
            self._request(sha, f, time.monotonic())
            return ChunkOutcome.NOTHING
        del self.fetches[sha]
        self.wanted = frozenset(self.fetches)
        return ChunkOutcome.NOTHING if self.fetches else ChunkOutcome.COMPLETE

    def tick(self) -> None:
        """Flush the bitmaps now and then; ask again for the chunks of a blob that stalls."""
        if not self.fetches:
            return
        now = time.monotonic()
        connected = self.is_connected()
        slow = self.settings.blob_stall_gap_factor * self._chunk_gap  # chunks come about this far apart
        for sha, f in list(self.fetches.items()):
            f.download.flush(force=False)
            if not connected:
                continue
            if now - max(f.last_progress, f.last_request) >= min(max(f.backoff, slow), self.settings.blob_stall_max_s):
                asked = f.last_request > float("-inf")
                if asked:
                    f.backoff = min(f.backoff * 2, self.settings.blob_stall_max_s)
                self._request(sha, f, now, waiting=asked and not f.suspect)

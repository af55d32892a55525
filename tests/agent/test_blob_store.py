"""The blob store: resumable chunked downloads, chunk and blob checks, space checks."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import pytest

from slmops_agent.blob_store import BlobStore, Chunk, InsufficientSpace
from slmops_agent.errors import BlobError

CHUNK = 1024


def make_blob(size: int, seed: int = 1) -> tuple[bytes, str]:
    data = (hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1))[:size]
    return data, hashlib.sha256(data).hexdigest()


def chunk(data: bytes, sha: str, index: int, chunk_size: int = CHUNK) -> Chunk:
    piece = data[index * chunk_size : (index + 1) * chunk_size]
    count = -(-len(data) // chunk_size)
    return Chunk(sha, index, count, len(data), chunk_size, hashlib.sha256(piece).hexdigest(), piece)


def test_download_completes_out_of_order_and_joins_the_store(tmp_path: Path) -> None:
    data, sha = make_blob(5 * CHUNK + 100)
    store = BlobStore(tmp_path, flush_interval_s=0)
    d = store.open_download(sha, len(data), CHUNK)
    assert d.count == 6 and d.missing() == [0, 1, 2, 3, 4, 5]
    assert os.stat(store.partial_path(sha)).st_size == len(data)  # preallocated
    for i in (5, 0, 3, 1, 4, 2):
        assert d.write_chunk(chunk(data, sha, i)) is True
    assert d.write_chunk(chunk(data, sha, 2)) is False  # duplicate
    assert d.complete and d.bytes_received == len(data)
    path = store.finish(d)
    assert path.read_bytes() == data and store.has(sha)
    assert not store.partial_path(sha).exists() and not store.bitmap_path(sha).exists()
    assert not os.access(path, os.W_OK) or os.geteuid() == 0  # read-only (root ignores modes)
    assert oct(path.stat().st_mode & 0o777) == oct(0o444)


def test_resume_after_reopening(tmp_path: Path) -> None:
    data, sha = make_blob(8 * CHUNK)
    store = BlobStore(tmp_path, flush_interval_s=0)
    d = store.open_download(sha, len(data), CHUNK)
    for i in (0, 2, 7):
        d.write_chunk(chunk(data, sha, i))
    d.close()
    # a new process: a new store object over the same folder
    d2 = BlobStore(tmp_path).open_download(sha, len(data), CHUNK)
    assert d2.received == 3 and d2.missing() == [1, 3, 4, 5, 6]
    assert d2.missing(limit=2) == [1, 3]
    for i in d2.missing():
        d2.write_chunk(chunk(data, sha, i))
    assert BlobStore(tmp_path).finish(d2).read_bytes() == data


def test_bitmap_never_claims_unflushed_chunks(tmp_path: Path) -> None:
    """Between flushes a crash loses only the bits, never claims chunks that are not on disk."""
    data, sha = make_blob(4 * CHUNK)
    store = BlobStore(tmp_path, flush_interval_s=3600)
    d = store.open_download(sha, len(data), CHUNK)
    d.write_chunk(chunk(data, sha, 0))
    d.flush(force=True)
    d.write_chunk(chunk(data, sha, 1))  # within the flush interval: not yet in the bitmap file
    # "crash": no close(); reopen from disk
    again = BlobStore(tmp_path).open_download(sha, len(data), CHUNK)
    assert again.missing() == [1, 2, 3]
    assert d.flushes == 1


def test_a_different_chunk_size_restarts_the_download(tmp_path: Path) -> None:
    data, sha = make_blob(4 * CHUNK)
    store = BlobStore(tmp_path, flush_interval_s=0)
    d = store.open_download(sha, len(data), CHUNK)
    d.write_chunk(chunk(data, sha, 0))
    d.close()
    d2 = store.open_download(sha, len(data), 2 * CHUNK)
    assert d2.received == 0 and d2.count == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"data": b"x" * CHUNK}, "SHA-256"),
        ({"index": 99}, "out of range"),
        ({"data": b"x" * 10, "chunk_sha256": hashlib.sha256(b"x" * 10).hexdigest()}, "bytes, expected"),
        ({"blob_size": 4 * CHUNK + 1}, "expected"),
        ({"count": 2, "chunk_size": 2 * CHUNK}, "chunk size"),
        ({"blob_sha256": "0" * 64}, "offered"),
    ],
)
def test_bad_chunks_are_refused_and_not_written(tmp_path: Path, changes: dict[str, object], message: str) -> None:
    data, sha = make_blob(4 * CHUNK)
    store = BlobStore(tmp_path, flush_interval_s=0)
    d = store.open_download(sha, len(data), CHUNK)
    with pytest.raises(BlobError, match=message):
        d.write_chunk(dataclasses.replace(chunk(data, sha, 1), **changes))  # type: ignore[arg-type]
    assert d.received == 0 and d.missing() == [0, 1, 2, 3]


def test_a_bad_blob_is_detected_and_deleted(tmp_path: Path) -> None:
    """Every chunk is self-consistent, but the whole is not the announced blob (tampering)."""
    data, sha = make_blob(3 * CHUNK)
    evil = b"E" * len(data)
    store = BlobStore(tmp_path, flush_interval_s=0)
    d = store.open_download(sha, len(data), CHUNK)
    for i in range(3):
        d.write_chunk(chunk(evil, sha, i))
    with pytest.raises(BlobError, match="fails its SHA-256 check"):
        store.finish(d)
    assert not store.has(sha)
    assert not store.partial_path(sha).exists() and not store.bitmap_path(sha).exists()
    fresh = store.open_download(sha, len(data), CHUNK)  # fetched again from scratch
    assert fresh.received == 0


def test_space_check_and_bytes_to_fetch(tmp_path: Path) -> None:
    data, sha = make_blob(2 * CHUNK)
    store = BlobStore(tmp_path)
    assert store.bytes_to_fetch({sha: len(data), "a" * 64: 10}) == len(data) + 10
    store.check_space(1, 0)
    with pytest.raises(InsufficientSpace, match="not enough disk"):
        store.check_space(store.free_bytes() + 1, 0)


def test_import_file_checks_the_hash(tmp_path: Path) -> None:
    data, sha = make_blob(100)
    src = tmp_path / "src"
    src.write_bytes(data)
    store = BlobStore(tmp_path / "blobs")
    assert store.import_file(src, sha, len(data)).read_bytes() == data
    bad = tmp_path / "bad"
    bad.write_bytes(b"z" * 100)
    _, other = make_blob(100, seed=2)
    with pytest.raises(BlobError, match="SHA-256"):
        store.import_file(bad, other, 100)
    assert not store.has(other)
    assert store.verify(sha, len(data)) is None
    assert "missing" in (store.verify(other, 100) or "")


def test_gc_keeps_only_what_is_named(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, flush_interval_s=0)
    keep_data, keep = make_blob(10, 1)
    drop_data, drop = make_blob(10, 2)
    store.import_file(_write(tmp_path / "k", keep_data), keep, 10)
    store.import_file(_write(tmp_path / "d", drop_data), drop, 10)
    partial_data, partial = make_blob(4 * CHUNK, 3)
    d = store.open_download(partial, len(partial_data), CHUNK)
    d.write_chunk(chunk(partial_data, partial, 0))
    d.close()
    freed = store.gc({keep})
    assert freed >= 10 + len(partial_data)
    assert store.has(keep) and not store.has(drop)
    assert not store.partial_path(partial).exists() and not store.bitmap_path(partial).exists()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path

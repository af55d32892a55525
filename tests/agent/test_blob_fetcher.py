"""The fetcher marks a request `waiting` (what it lacks may still be on its way) only when it asked
before, stayed connected and got no bad chunk since: after a reconnect or a bad chunk the fleet must
send what it asks for. A real blob store on disk, the agent's own stall timer."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from agent_helpers import agent_settings

from slmops_agent.blob_store import BlobStore, Chunk
from slmops_agent.update.fetcher import BlobFetcher
from slmops_agent.update.messages import BlobWant
from slmops_testing.packages import random_bytes

CHUNK = 256 * 1024


def test_a_request_is_waiting_only_while_nothing_can_have_been_lost(tmp_path: Path) -> None:
    data = random_bytes(3 * CHUNK, 5)
    sha = hashlib.sha256(data).hexdigest()
    settings = agent_settings(tmp_path / "state", blob_stall_s=0.05, blob_stall_max_s=0.05, blob_stall_gap_factor=0)
    sent: list[BlobWant] = []
    store = BlobStore(tmp_path / "blobs")
    fetcher = BlobFetcher(store, settings, on_blob_request=sent.append, is_connected=lambda: True)

    def stall() -> BlobWant:
        n = len(sent)
        deadline = time.monotonic() + 5
        while len(sent) == n:
            assert time.monotonic() < deadline, "no request after a stall"
            time.sleep(0.01)
            fetcher.tick()
        return sent[-1]

    fetcher.open({sha: len(data)}, CHUNK, lambda s: s[:12])
    assert sent == [BlobWant(sha, (), CHUNK, False)]  # the first request
    assert stall() == BlobWant(sha, (), CHUNK, True)  # asked before, nothing came: maybe on its way

    fetcher.reconnected()
    fetcher.tick()
    assert sent[-1] == BlobWant(sha, (), CHUNK, False)  # what was on its way may be lost with the connection
    assert stall().waiting

    good = Chunk(sha, 0, 3, len(data), CHUNK, hashlib.sha256(data[:CHUNK]).hexdigest(), data[:CHUNK])
    bad = Chunk(sha, 1, 3, len(data), CHUNK, "00" * 32, data[CHUNK : 2 * CHUNK])
    fetcher.on_chunk(good)
    fetcher.on_chunk(bad)
    assert fetcher.bad_chunks == 1
    assert stall() == BlobWant(sha, (1, 2), CHUNK, False)  # a chunk it got was bad: not on its way
    assert stall() == BlobWant(sha, (1, 2), CHUNK, True)
    fetcher.close()

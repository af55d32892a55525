"""Hot swap through the real path: the updater installs v1, gRPC streams run on it, the updater
installs v2 and flips the active slot while they run. In-flight streams finish on v1, requests
arriving after the flip get v2, and no request fails."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from agent_helpers import ServerThread
from update_rig import Rig, install

from slmops_agent.runtime.model import ModelInfo
from slmops_agent.runtime.requests import GenerationRequest
from slmops_protos.agent.v1 import agent_pb2, agent_pb2_grpc
from slmops_protos.states import UpdateState

TOKENS = 12


def hold_old_streams(rig: Rig, release: threading.Event) -> None:
    """Requests answered by v1 pause after their second piece until `release` (a slow reader):
    they are surely in flight when the slot flips."""
    submit = rig.host.submit

    def held_submit(
        req: GenerationRequest,
        *,
        cancel: threading.Event | None = None,
        on_text: Callable[[str], None] | None = None,
        on_start: Callable[[ModelInfo], None] | None = None,
        client: str = "",
    ) -> Any:
        seen: dict[str, Any] = {"version": "", "pieces": 0}

        def started(info: ModelInfo) -> None:
            seen["version"] = info.version
            if on_start is not None:
                on_start(info)

        def text(piece: str) -> None:
            seen["pieces"] += 1
            if seen["version"] == "1.0.0" and seen["pieces"] == 2 and req.max_new_tokens == TOKENS:
                assert release.wait(60), "never released"
            if on_text is not None:
                on_text(piece)

        return submit(req, cancel=cancel, on_text=text, on_start=started, client=client)

    rig.host.submit = held_submit  # type: ignore[method-assign]


def test_in_flight_streams_finish_on_the_old_model_and_new_requests_get_the_new_one(
    rig: Rig, pkg_v1: Path, pkg_v2: Path, short_dir: Path
) -> None:
    """One generation runs at a time (FIFO); the running v1 stream is held mid-way while the updater
    stages, tests and flips to v2; requests queued behind it and requests arriving later get v2."""
    assert install(rig, pkg_v1, 1).state is UpdateState.COMMITTED
    release = threading.Event()
    hold_old_streams(rig, release)
    server = ServerThread(rig.host, short_dir / "agent.sock", None)
    errors: list[BaseException] = []
    try:
        channel = grpc.insecure_channel(server.addresses[0])
        stub = agent_pb2_grpc.InferenceStub(channel)
        long = agent_pb2.GenerateRequest(prompt="Once upon a time", max_new_tokens=TOKENS, temperature=0.0)
        short = agent_pb2.GenerateRequest(prompt="Hello", max_new_tokens=3, temperature=0.0)
        first_piece = threading.Event()

        def stream(req: agent_pb2.GenerateRequest, out: list[agent_pb2.GenerateResponse]) -> None:
            try:
                for chunk in stub.Generate(req, timeout=60):
                    out.append(chunk)
                    first_piece.set()
            except BaseException as exc:
                errors.append(exc)

        def spawn(req: agent_pb2.GenerateRequest) -> tuple[threading.Thread, list[agent_pb2.GenerateResponse]]:
            out: list[agent_pb2.GenerateResponse] = []
            t = threading.Thread(target=stream, args=(req, out))
            t.start()
            return t, out

        held, held_out = spawn(long)
        assert first_piece.wait(30) and not errors, errors  # running on v1, now held after its second piece
        queued = [spawn(short) for _ in range(2)]  # wait behind it (bound 4: 1 running + 2 waiting)
        deadline = time.monotonic() + 10
        while rig.host.queue.depth < 3:
            assert time.monotonic() < deadline, rig.host.queue.depth
            time.sleep(0.01)

        record = install(rig, pkg_v2, 2)  # stage v2 in slot b, smoke-test it, flip: all while v1 streams
        assert record.state is UpdateState.COMMITTED, record.reason
        assert rig.serving() == "2.0.0" and record.active_slot == "b"
        assert held.is_alive() and len(held_out) == 1 and held_out[0].model_version == "1.0.0"
        arriving = [spawn(short)]  # a request that arrives after the flip

        release.set()
        for t, _ in [(held, held_out), *queued, *arriving]:
            t.join(60)
            assert not t.is_alive()
        assert not errors, errors
        # the in-flight stream finished whole on the old model
        final = held_out[-1]
        assert final.finish_reason == agent_pb2.LENGTH and final.usage.completion_tokens == TOKENS
        assert {c.model_version for c in held_out} == {"1.0.0"}
        # everything that started after the flip answered from the new one
        for _, out in [*queued, *arriving]:
            assert out[-1].usage.completion_tokens == 3 and {c.model_version for c in out} == {"2.0.0"}
        again = stub.GenerateUnary(long, timeout=30)
        assert again.model_version == "2.0.0" and again.usage.completion_tokens == TOKENS
        assert rig.host.queue.depth == 0
        status = stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=10)
        assert status.active_model.version == "2.0.0" and status.active_slot == "b"
        assert status.errors_total == 0 and status.requests_total == 5
        channel.close()
    finally:
        release.set()
        server.stop()

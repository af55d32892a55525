"""An adapter-only release through the real processes (`slmops fleet serve` with its embedded broker,
one `slmops agent run`): the device runs a base built with LoRA inputs, the fleet rolls out an
adapter package bound to it, only the adapter's blob travels, and the agent answers with the adapter."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from slmops_cli.procs import ProcessFailed
from slmops_testing.processes import AgentProc, FleetProc

pytestmark = pytest.mark.timeout(300)


def _blob_sizes(package: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (package / "blobs").iterdir()}


def test_an_adapter_release_moves_only_the_adapter(
    tmp_path: Path,
    adapter_pair: tuple[Path, Path],
    signing_key: tuple[Path, Path],
    run_fleet: Callable[..., FleetProc],
    enroll_agent: Callable[..., AgentProc],
) -> None:
    base, adapter = adapter_pair
    fleet = run_fleet(tmp_path / "fleet", [signing_key[1]])
    agent = enroll_agent(fleet, tmp_path / "agent", "agent-1")
    base_id = fleet.release(base)
    fleet.wait_committed(base_id)
    sent_before = sum(fleet.blob_bytes_sent().values())

    adapter_id = fleet.release(adapter)
    fleet.wait_committed(adapter_id)
    moved = sum(fleet.blob_bytes_sent().values()) - sent_before
    adapter_bytes, base_bytes = sum(_blob_sizes(adapter).values()), sum(_blob_sizes(base).values())
    assert adapter_bytes <= moved < adapter_bytes + base_bytes // 10, (moved, adapter_bytes, base_bytes)

    device = next(iter(fleet.devices().values()))
    assert device["active_package_id"] == adapter_id
    answer = agent.ask("Hi", "--max-new-tokens", "3", "--adapter", "lora", "--temperature", "0")
    assert answer["package_id"] == adapter_id and answer["completion_tokens"] >= 1
    plain = agent.ask("Hi", "--max-new-tokens", "3", "--temperature", "0")
    assert plain["package_id"] == adapter_id  # the base answers without the adapter too
    with pytest.raises(ProcessFailed, match="adapter 'nope' is not loaded"):
        agent.ask("Hi", "--adapter", "nope")

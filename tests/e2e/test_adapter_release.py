"""An adapter-only release through the real processes (`slmops fleet serve` with its embedded broker,
one `slmops agent run`): the device runs a base built with LoRA inputs, the fleet rolls out an
adapter package bound to it, only the adapter's blob travels, and the agent answers with the adapter."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from slmops_cli.procs import ProcessFailed, run, run_json
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


def test_two_adapters_stay_resident_and_one_is_removed(
    tmp_path: Path,
    adapter_pair: tuple[Path, Path],
    signing_key: tuple[Path, Path],
    run_fleet: Callable[..., FleetProc],
    enroll_agent: Callable[..., AgentProc],
) -> None:
    """Two adapter packages on one base, rolled out one after the other through the fleet, both
    answer by name; a new version of one replaces it and leaves the other; `slmops agent
    remove-adapter` takes one away and the other keeps serving."""
    from slmops_builder.train import adapters

    base, first = adapter_pair
    (blob,) = (first / "blobs").iterdir()
    second_file = tmp_path / "lora2.onnx_adapter"
    second_file.write_bytes(blob.read_bytes())
    second = adapters.package_adapter(
        second_file, adapter_name="lora2", name="tiny-lora2", version="0.1.0", base_package=base,
        key=signing_key[0], out=tmp_path / "second",
    ).path  # fmt: skip
    fleet = run_fleet(tmp_path / "fleet", [signing_key[1]])
    agent = enroll_agent(fleet, tmp_path / "agent", "agent-1")
    ids = []
    for package in (base, first, second):
        ids.append(fleet.release(package))
        fleet.wait_committed(ids[-1])

    def ask(adapter: str) -> dict[str, object]:
        return agent.ask("Hi", "--max-new-tokens", "3", "--adapter", adapter, "--temperature", "0")

    models = run_json(["agent", "models", "--state-dir", str(agent.state_dir), "--json"])
    assert sorted(next(m for m in models if m.get("active"))["adapters"]) == ["lora", "lora2"]
    assert all(int(str(ask(name)["completion_tokens"])) >= 1 for name in ("lora", "lora2"))

    first_file = tmp_path / "lora.onnx_adapter"
    first_file.write_bytes(blob.read_bytes())
    update = adapters.package_adapter(
        first_file, adapter_name="lora", name="tiny-lora", version="0.2.0", base_package=base,
        key=signing_key[0], out=tmp_path / "update",
    ).path  # fmt: skip
    fleet.wait_committed(fleet.release(update))  # a new version of "lora" replaces it; lora2 stays
    models = run_json(["agent", "models", "--state-dir", str(agent.state_dir), "--json"])
    assert sorted(next(m for m in models if m.get("active"))["adapters"]) == ["lora", "lora2"]
    assert int(str(ask("lora2")["completion_tokens"])) >= 1

    run(["agent", "remove-adapter", "lora", "--state-dir", str(agent.state_dir)])
    models = run_json(["agent", "models", "--state-dir", str(agent.state_dir), "--json"])
    assert next(m for m in models if m.get("active"))["adapters"] == ["lora2"]
    fleet.wait_committed(ids[2])  # the fleet hears that lora2's package serves now
    assert int(str(ask("lora2")["completion_tokens"])) >= 1
    with pytest.raises(ProcessFailed, match="adapter 'lora' is not loaded"):
        ask("lora")
    with pytest.raises(ProcessFailed, match="adapter 'nope' is not installed"):
        run(["agent", "remove-adapter", "nope", "--state-dir", str(agent.state_dir)])

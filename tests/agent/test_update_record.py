"""The persisted update-state record: atomic writes, format, transitions, the recovery table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from slmops_agent.layout import write_atomic
from slmops_agent.update_record import (
    RECOVERY,
    SIDE_EFFECTS,
    TRANSITIONS,
    Recovery,
    SlotInfo,
    StateError,
    StateStore,
    UpdateRecord,
    check_transition,
)
from slmops_protos.fleet.v1 import fleet_pb2
from slmops_protos.states import UpdateState


def test_state_names_match_the_contract() -> None:
    for state in UpdateState:
        assert fleet_pb2.UpdateState.Name(state.to_pb()) == state.value
    assert {s.value for s in UpdateState} == {v.name for v in fleet_pb2.UpdateState.DESCRIPTOR.values if v.number != 0}


def test_every_state_has_a_recovery_rule_and_a_side_effect() -> None:
    assert set(RECOVERY) == set(UpdateState) == set(SIDE_EFFECTS) == set(TRANSITIONS)


def test_record_round_trip_and_write_count(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    assert store.load() == UpdateRecord()  # no file yet: a fresh IDLE record
    record = UpdateRecord(
        state=UpdateState.TESTING,
        generation=7,
        target_package_id="ab" * 32,
        target_slot="b",
        active_slot="a",
        slots={"a": SlotInfo("cd" * 32, "m", "1.0.0", "cpu-int4"), "b": None},
        test_attempts=1,
    )
    saved = store.save(record)
    assert saved.writes == 1 and saved.updated_unix_ms > 0
    loaded = store.load()
    assert loaded == saved
    assert loaded.active == SlotInfo("cd" * 32, "m", "1.0.0", "cpu-int4") and loaded.inactive_slot == "b"
    data = json.loads((tmp_path / "state.json").read_text())
    assert data["version"] == 1 and data["state"] == "TESTING"  # stable on-disk names
    assert store.save(loaded).writes == 2


def test_atomic_write_leaves_no_temp_file_and_replaces_whole(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, b"old")
    write_atomic(path, b"new content")
    assert path.read_bytes() == b"new content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_crash_before_the_rename_keeps_the_old_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(tmp_path / "state.json")
    first = store.save(UpdateRecord(state=UpdateState.COMMITTED, generation=3))

    def crash(src: object, dst: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        store.save(UpdateRecord(state=UpdateState.FETCHING, generation=4))
    monkeypatch.undo()
    assert store.load() == first  # the half-written temp file is never read


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read"),
        (json.dumps({"version": 99, "state": "IDLE"}), "version"),
        (json.dumps({"version": 1, "state": "SLEEPING"}), "malformed"),
        (json.dumps({"version": 1, "state": "IDLE", "active_slot": "c"}), "unknown active slot"),
    ],
)
def test_a_bad_record_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "state.json").write_text(content)
    with pytest.raises(StateError, match=message):
        StateStore(tmp_path / "state.json").load()


@pytest.mark.parametrize(
    ("old", "new", "allowed"),
    [
        ("IDLE", "FETCHING", True),
        ("FETCHING", "VERIFYING", True),
        ("VERIFYING", "STAGED", True),
        ("STAGED", "TESTING", True),
        ("TESTING", "COMMITTED", True),
        ("COMMITTED", "FETCHING", True),
        ("ROLLED_BACK", "FETCHING", True),
        ("FETCHING", "ROLLED_BACK", True),
        ("TESTING", "ROLLED_BACK", True),
        ("IDLE", "COMMITTED", True),  # the desired package is already active
        ("FETCHING", "STAGED", False),
        ("IDLE", "TESTING", False),
        ("VERIFYING", "COMMITTED", False),
        ("STAGED", "COMMITTED", False),
    ],
)
def test_transitions(old: str, new: str, allowed: bool) -> None:
    if allowed:
        check_transition(UpdateState(old), UpdateState(new))
    else:
        with pytest.raises(StateError, match="not allowed"):
            check_transition(UpdateState(old), UpdateState(new))


def test_recovery_table_is_explicit() -> None:
    assert RECOVERY[UpdateState.FETCHING] is Recovery.RESUME_FETCH
    assert RECOVERY[UpdateState.TESTING] is Recovery.TEST_AGAIN_ONCE
    assert RECOVERY[UpdateState.COMMITTED] is Recovery.FINISH_COMMIT
    assert RECOVERY[UpdateState.ROLLED_BACK] is Recovery.FINISH_ROLLBACK


def test_a_slots_resident_adapter_packages_survive_a_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    info = SlotInfo("cd" * 32, "lora2", "0.1.0", "cpu", base_package_id="ef" * 32, adapters=("12" * 32, "34" * 32))
    store.save(UpdateRecord(state=UpdateState.COMMITTED, active_slot="a", slots={"a": info, "b": None}))
    assert store.load().active == info
    data = json.loads((tmp_path / "state.json").read_text())
    del data["slots"]["a"]["adapters"]  # a record from before resident adapters
    (tmp_path / "state.json").write_text(json.dumps(data))
    assert store.load().active == SlotInfo("cd" * 32, "lora2", "0.1.0", "cpu", base_package_id="ef" * 32)

"""The update state machine end to end with the real tiny packages and onnxruntime-genai, without a
fleet: DesiredState messages and chunks are fed to the updater directly."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest
from agent_helpers import SMALL_CHUNK, desired_for, manifest_of, pkg_id, signed_manifest
from update_rig import DEVICE, Rig, install

from slmops_agent.codec import desired_from_pb, report_to_pb
from slmops_agent.runtime.requests import GenerationRequest
from slmops_agent.update_record import StateStore
from slmops_protos.manifests import parse_signed_manifest
from slmops_protos.package.v1 import manifest_pb2
from slmops_protos.states import UpdateState

HAPPY = ["FETCHING", "VERIFYING", "STAGED", "TESTING", "COMMITTED"]


class Crash(BaseException):
    """Stands for a power cut: escapes the worker's error handling and ends its thread."""


def test_install_then_update_to_a_version_that_changes_one_file(rig: Rig, pkg_v1: Path, pkg_v2: Path) -> None:
    record = install(rig, pkg_v1, 1)
    assert record.state is UpdateState.COMMITTED, record.reason
    assert rig.states(1) == HAPPY
    assert record.active_slot == "a" and rig.serving() == "1.0.0"
    assert os.readlink(rig.state_dir / "current") == "slots/a"
    # the golden prompt ran on the device and reproduced the builder's greedy reference
    golden = manifest_of(pkg_v1).golden_prompts
    assert len(golden) == len(rig.updater.last_smoke_test) >= 1
    smoke = rig.updater.last_smoke_test[0]
    assert smoke.matches is True and smoke.completion_tokens == golden[0].max_new_tokens
    assert (rig.state_dir / "slots" / "a" / "genai_config.json").is_file()
    whole = [w for w in rig.feeder.requests if not w.missing]
    assert len(whole) == len({f.sha256 for f in manifest_of(pkg_v1).files})
    assert {w.chunk_size for w in rig.feeder.requests} == {SMALL_CHUNK}
    result = rig.host.generate(GenerationRequest(messages=(("user", "Hello"),), max_new_tokens=5))
    assert result.model_version == "1.0.0" and result.completion_tokens >= 1

    rig.feeder.requests.clear()
    record = install(rig, pkg_v2, 2)
    assert record.state is UpdateState.COMMITTED, record.reason
    assert record.active_slot == "b" and rig.serving() == "2.0.0"
    assert os.readlink(rig.state_dir / "current") == "slots/b"
    # only the one changed file travelled
    v1 = {f.path: f.sha256 for f in manifest_of(pkg_v1).files}
    v2 = {f.path: f.sha256 for f in manifest_of(pkg_v2).files}
    changed = {v2[p] for p in v2 if v1.get(p) != v2[p]}
    assert changed and {w.sha256 for w in rig.feeder.requests} == changed
    # both versions stay installed; the old one is the fallback in slot a
    assert record.slots["a"] is not None and record.slots["a"].version == "1.0.0"
    assert record.slots["b"] is not None and record.slots["b"].version == "2.0.0"
    on_disk = StateStore(rig.state_dir / "state.json").load()
    assert on_disk == record


def test_reports_keep_what_the_update_fetched_and_the_other_slot_returns_without_a_fetch(
    rig: Rig, pkg_v1: Path, pkg_v2: Path
) -> None:
    blobs = {f.sha256: f.size for f in manifest_of(pkg_v1).files}
    install(rig, pkg_v1, 1)
    done = [r for r in rig.reports if r.generation == 1 and r.state is UpdateState.COMMITTED][-1]
    # COMMITTED still says what the update fetched: all of v1's blobs, all received
    assert done.bytes_needed == done.bytes_received == sum(blobs.values())
    install(rig, pkg_v2, 2)
    v1 = {f.path: f.sha256 for f in manifest_of(pkg_v1).files}
    changed = {f.sha256: f.size for f in manifest_of(pkg_v2).files if v1.get(f.path) != f.sha256}
    done = [r for r in rig.reports if r.generation == 2 and r.state is UpdateState.COMMITTED][-1]
    assert done.bytes_needed == done.bytes_received == sum(changed.values())

    # back to v1, still in the other slot: swapped in with nothing fetched, and the report says so
    rig.feeder.requests.clear()
    rig.desired(pkg_v1, 3)
    record = rig.wait_done(3)
    assert record.state is UpdateState.COMMITTED, record.reason
    assert record.active_slot == "a" and rig.serving() == "1.0.0"
    assert rig.feeder.requests == []
    reports = [r for r in rig.reports if r.generation == 3]
    assert reports and all(r.bytes_needed == 0 and r.bytes_received == 0 for r in reports)


def test_the_runtime_settings_reach_the_loaded_model(tmp_path: Path, trusted_hex: str, pkg_v1: Path) -> None:
    rig = Rig(tmp_path / "state", trusted_hex, threads=1, spinning=True, max_batch=1)
    rig.updater.start()
    try:
        assert install(rig, pkg_v1, 1).state is UpdateState.COMMITTED
    finally:
        rig.updater.stop()
    model = rig.host.model
    assert model is not None and (model.threads, model.spinning, model.max_batch) == (1, True, 1)


def test_old_generations_are_ignored_and_the_same_package_is_a_no_op(rig: Rig, pkg_v1: Path) -> None:
    install(rig, pkg_v1, 5)
    writes = rig.updater.record.writes
    rig.desired(pkg_v1, 5)  # the retained message again, after a reconnect
    rig.desired(pkg_v1, 3)
    rig.desired(None, 4)
    rig.feeder.requests.clear()
    rig.desired(pkg_v1, 6)  # a newer generation naming what already runs
    record = rig.wait_done(6)
    assert record.state is UpdateState.COMMITTED and record.writes == writes + 1
    assert rig.states(6) == ["COMMITTED"] and not rig.feeder.requests
    rig.desired(None, 7)  # no model: keep what runs
    record = rig.wait(lambda r: r.generation == 7)
    assert record.state is UpdateState.COMMITTED and rig.serving() == "1.0.0"


def test_absurd_generation_jumps_are_refused(
    rig: Rig, pkg_v1: Path, pkg_v2: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A forged retained desired state with generation 2^64-1 (or any jump past 2^32, or past 2^63-1)
    is refused, so the real desired states that follow are still taken."""
    caplog.set_level(logging.WARNING, logger="slmops_agent.update.machine")
    install(rig, pkg_v1, 1)
    rig.feeder.add(pkg_v2)
    for forged in (2**64 - 1, 2**63, 2 + 2**32):
        rig.desired(pkg_v2, forged)
    rig.desired(None, 1 + 2**32)  # the largest step allowed: taken (no model: keep what runs)
    record = rig.wait(lambda r: r.generation == 1 + 2**32)
    assert record.state is UpdateState.COMMITTED and rig.serving() == "1.0.0"
    rig.desired(pkg_v2, 2 + 2**32)
    record = rig.wait_done(2 + 2**32, timeout=30)
    assert record.state is UpdateState.COMMITTED and rig.serving() == "2.0.0"
    refused = [r.getMessage() for r in caplog.records if "refused desired generation" in r.getMessage()]
    assert len(refused) == 3 and str(2**64 - 1) in refused[0]


def test_a_download_follows_the_fleets_chunk_size(rig: Rig, pkg_v1: Path) -> None:
    """The desired state named one chunk size and the fleet sends chunks in another (its setting changed
    after it published that state, and it answers every request in its own): each download starts
    again in the fleet's chunk size and the package commits."""
    rig.feeder.chunk_size = 2 * SMALL_CHUNK
    rig.feeder.add(pkg_v1)
    rig.desired(pkg_v1, 1)
    record = rig.wait_done(1, timeout=30)
    assert record.state is UpdateState.COMMITTED, record.reason
    assert rig.updater.fetcher.bad_chunks == 0 and rig.serving() == "1.0.0"


def test_bad_signature_rolls_back_and_the_old_version_keeps_serving(rig: Rig, pkg_v1: Path, pkg_v2: Path) -> None:
    install(rig, pkg_v1, 1)
    msg = desired_for(pkg_v2, 2, DEVICE)
    sig = bytearray(msg.model.manifest.signatures[0].signature)
    sig[0] ^= 0xFF
    msg.model.manifest.signatures[0].signature = bytes(sig)
    rig.updater.submit_desired(desired_from_pb(msg))
    record = rig.wait_done(2)
    assert record.state is UpdateState.ROLLED_BACK and "bad signature" in record.reason
    assert rig.states(2) == ["ROLLED_BACK"] and rig.reports[-1].reason == record.reason
    assert rig.serving() == "1.0.0" and record.active_slot == "a"
    assert rig.reports[-1].active_version == "1.0.0"


def test_untrusted_key_and_mismatched_id_are_refused(rig: Rig, pkg_v1: Path, other_key_pkg: Path) -> None:
    rig.desired(other_key_pkg, 1)
    record = rig.wait_done(1)
    assert record.state is UpdateState.ROLLED_BACK and "untrusted" in record.reason
    msg = desired_for(pkg_v1, 2, DEVICE)
    msg.model.package_id = "0" * 64
    rig.updater.submit_desired(desired_from_pb(msg))
    record = rig.wait_done(2)
    assert record.state is UpdateState.ROLLED_BACK and "does not match its manifest" in record.reason
    assert rig.serving() == "" and not rig.feeder.requests


def test_tampered_blob_rolls_back_after_refetching(rig: Rig, pkg_v1: Path, pkg_v2: Path) -> None:
    install(rig, pkg_v1, 1)
    rig.feeder.add(pkg_v2)
    genai = next(f for f in manifest_of(pkg_v2).files if f.path == "genai_config.json")
    rig.feeder.tamper[genai.sha256] = rig.feeder.blobs[genai.sha256].replace(b'"top_k": 7', b'"top_k": 9')
    rig.feeder.requests.clear()
    rig.desired(pkg_v2, 2)
    record = rig.wait_done(2)
    assert record.state is UpdateState.ROLLED_BACK
    assert "genai_config.json" in record.reason and "SHA-256" in record.reason and "2 times" in record.reason
    assert [w.sha256 for w in rig.feeder.requests] == [genai.sha256, genai.sha256]  # fetched again once
    assert not any(w.waiting for w in rig.feeder.requests)  # a blob that failed its check is not on its way
    assert rig.serving() == "1.0.0" and record.active_slot == "a"
    assert not (rig.state_dir / "blobs" / genai.sha256).exists()


def test_a_package_that_fails_its_test_rolls_back(
    rig: Rig, pkg_v1: Path, tmp_path: Path, signing_key: tuple[Path, Path]
) -> None:
    from slmops_builder.keys import load_private_key
    from slmops_builder.packaging import PackageSpec, write_package

    install(rig, pkg_v1, 1)
    source = tmp_path / "broken-src"
    source.mkdir()
    (source / "genai_config.json").write_text('{"model": {"type": "llama"}}')
    broken = write_package(
        source,
        PackageSpec("broken", "3.0.0", manifest_pb2.HardwareProfile(name="cpu-int4", execution_provider="cpu")),
        load_private_key(signing_key[0]),
        tmp_path / "broken",
    ).path
    rig.feeder.add(broken)
    rig.desired(broken, 2)
    record = rig.wait_done(2)
    assert record.state is UpdateState.ROLLED_BACK and record.reason.startswith("TESTING:"), record.reason
    assert rig.states(2) == ["FETCHING", "VERIFYING", "STAGED", "TESTING", "ROLLED_BACK"]
    assert rig.serving() == "1.0.0" and record.active_slot == "a"
    assert not (rig.state_dir / "slots" / "b").exists()  # the half-installed slot is wiped
    assert record.slots["b"] is None


def test_latency_budget(tmp_path: Path, trusted_hex: str, pkg_v1: Path) -> None:
    rig = Rig(tmp_path / "state", trusted_hex, smoke_test_budget_s=0.000_001)
    rig.updater.start()
    try:
        record = install(rig, pkg_v1, 1)
    finally:
        rig.updater.stop()
    assert record.state is UpdateState.ROLLED_BACK and "budget" in record.reason
    assert rig.serving() == "" and record.active_slot == ""


def test_missing_chunks_are_asked_for_exactly(tmp_path: Path, trusted_hex: str, pkg_v1: Path) -> None:
    rig = Rig(tmp_path / "state", trusted_hex, blob_stall_s=0.3)
    big = max(manifest_of(pkg_v1).files, key=lambda f: f.size)
    rig.feeder.drop[big.sha256] = {1, 3}
    rig.updater.start()
    try:
        record = install(rig, pkg_v1, 1)
    finally:
        rig.updater.stop()
    assert record.state is UpdateState.COMMITTED, record.reason
    repairs = [w for w in rig.feeder.requests if w.missing]
    assert repairs and repairs[0].sha256 == big.sha256 and repairs[0].missing == (1, 3)
    # Asked after a stall, connected all along: what it lacks may still be on its way (the fleet judges).
    assert repairs[0].waiting and not any(w.waiting for w in rig.feeder.requests if not w.missing)


def test_repair_requests_are_capped_per_message(tmp_path: Path, trusted_hex: str, pkg_v1: Path) -> None:
    rig = Rig(tmp_path / "state", trusted_hex, blob_stall_s=0.2, blob_request_max_chunks=2)
    big = max(manifest_of(pkg_v1).files, key=lambda f: f.size)
    count = -(-big.size // SMALL_CHUNK)
    rig.feeder.drop[big.sha256] = set(range(1, count))  # only chunk 0 arrives by broadcast
    rig.updater.start()
    try:
        record = install(rig, pkg_v1, 1)
    finally:
        rig.updater.stop()
    assert record.state is UpdateState.COMMITTED, record.reason
    repairs = [w.missing for w in rig.feeder.requests if w.missing]
    assert repairs[0] == (1, 2) and all(len(m) <= 2 for m in repairs)
    assert sorted(i for m in repairs for i in m) == list(range(1, count))  # each missing chunk asked once


def test_chunks_slower_than_the_stall_time_are_not_a_stall(tmp_path: Path, trusted_hex: str, pkg_v1: Path) -> None:
    """A broker fanning a broadcast out to many devices delivers a chunk every few seconds: once the
    agent has seen that pace it waits blob_stall_gap_factor times the gap before asking again."""
    big = max(manifest_of(pkg_v1).files, key=lambda f: f.size)
    count = -(-big.size // SMALL_CHUNK)
    assert count >= 6, count
    asked: dict[float, int] = {}
    for factor in (0.0, 2.0):
        rig = Rig(tmp_path / f"state-{factor}", trusted_hex, blob_stall_s=0.2, blob_stall_gap_factor=factor)
        rig.feeder.pace_s = 0.35
        rig.updater.start()
        try:
            record = install(rig, pkg_v1, 1)
        finally:
            rig.updater.stop()
        assert record.state is UpdateState.COMMITTED, record.reason
        asked[factor] = sum(w.sha256 == big.sha256 and bool(w.missing) for w in rig.feeder.requests)
    assert asked[0.0] >= count - 3, asked  # about one request for its gaps per chunk without it
    assert asked[2.0] <= 1, asked  # at most one, before the pace was known


def test_download_resumes_after_a_restart(tmp_path: Path, trusted_hex: str, pkg_v1: Path) -> None:
    rig = Rig(tmp_path / "state", trusted_hex, blob_stall_s=30)
    big = max(manifest_of(pkg_v1).files, key=lambda f: f.size)
    count = -(-big.size // SMALL_CHUNK)
    rig.feeder.drop[big.sha256] = {count - 1}
    rig.updater.start()
    rig.feeder.add(pkg_v1)
    rig.desired(pkg_v1, 1)
    bitmap = rig.state_dir / "blobs" / f"{big.sha256}.bitmap"
    rig.wait(lambda r: r.state is UpdateState.FETCHING)
    # Every chunk in but the dropped last one (on a loaded machine they arrive well after FETCHING).
    last = big.size - (count - 1) * SMALL_CHUNK
    fetcher = rig.updater.fetcher
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
        len(fetcher.fetches) != 1 or fetcher.bytes_needed - fetcher.bytes_received != last
    ):
        time.sleep(0.05)
    assert len(fetcher.fetches) == 1 and fetcher.bytes_needed - fetcher.bytes_received == last
    rig.updater.stop()  # flushes the bitmaps
    assert bitmap.exists()

    rig.feeder.requests.clear()
    rig.feeder.drop.clear()
    u = rig.new_updater()
    u.start()
    try:
        record = rig.wait_done(1)
    finally:
        u.stop()
    assert record.state is UpdateState.COMMITTED, record.reason
    assert [(w.sha256, w.missing) for w in rig.feeder.requests] == [(big.sha256, (count - 1,))]


# -- the recovery table, state by state: a crash right after each record is saved --------------
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize(
    ("crash_in", "serving_after", "state_after"),
    [
        ("FETCHING", "2.0.0", "COMMITTED"),
        ("VERIFYING", "2.0.0", "COMMITTED"),
        ("STAGED", "2.0.0", "COMMITTED"),
        ("TESTING", "2.0.0", "COMMITTED"),  # tested again once
        ("COMMITTED", "2.0.0", "COMMITTED"),
    ],
)
def test_recovery_after_a_crash_in_each_state(
    tmp_path: Path, trusted_hex: str, pkg_v1: Path, pkg_v2: Path, crash_in: str, serving_after: str, state_after: str
) -> None:
    rig = Rig(tmp_path / "state", trusted_hex)
    rig.updater.start()
    install(rig, pkg_v1, 1)
    rig.updater.stop()

    crashed = threading.Event()
    u = rig.new_updater(crash_after_state=crash_in)

    def crash() -> None:
        crashed.set()
        raise Crash

    u.crash = crash  # type: ignore[method-assign]
    rig.host.swap(None)  # a new process starts with nothing loaded
    u.start()
    rig.feeder.add(pkg_v2)
    rig.desired(pkg_v2, 2)
    assert crashed.wait(60)
    u._thread.join(10)  # type: ignore[union-attr]
    on_disk = StateStore(rig.state_dir / "state.json").load()
    assert on_disk.state.value == crash_in
    # what serves right after the restart is the record's active slot: old before COMMITTED, new after
    rig.host.swap(None)
    u2 = rig.new_updater()
    u2.start()
    try:
        assert u2.wait_recovered(60)
        record = rig.wait_done(2)
    finally:
        u2.stop()
    assert record.state.value == state_after, record.reason
    assert rig.serving() == serving_after
    assert os.readlink(rig.state_dir / "current") == f"slots/{record.active_slot}"
    assert not list((rig.state_dir / "slots").glob("*.staging"))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_second_crash_in_testing_rolls_back(tmp_path: Path, trusted_hex: str, pkg_v1: Path, pkg_v2: Path) -> None:
    rig = Rig(tmp_path / "state", trusted_hex)
    rig.updater.start()
    install(rig, pkg_v1, 1)
    rig.updater.stop()
    for _ in range(2):
        u = rig.new_updater(crash_after_state="TESTING")
        crashed = threading.Event()

        def crash(flag: threading.Event = crashed) -> None:
            flag.set()
            raise Crash

        u.crash = crash  # type: ignore[method-assign]
        u.start()
        if StateStore(rig.state_dir / "state.json").load().state is not UpdateState.TESTING:
            rig.feeder.add(pkg_v2)
            rig.desired(pkg_v2, 2)
        assert crashed.wait(60)
        u._thread.join(10)  # type: ignore[union-attr]
    assert StateStore(rig.state_dir / "state.json").load().test_attempts == 2
    rig.host.swap(None)
    u = rig.new_updater()
    u.start()
    try:
        record = rig.wait_done(2)
    finally:
        u.stop()
    assert record.state is UpdateState.ROLLED_BACK and "while testing" in record.reason
    assert rig.serving() == "1.0.0" and record.active_slot == "a"


def test_side_loaded_package(tmp_path: Path, trusted_hex: str, pkg_v1: Path) -> None:
    rig = Rig(tmp_path / "state", trusted_hex)
    rig.updater.start()
    try:
        rig.updater.install_local(pkg_v1)
        record = rig.wait(lambda r: r.state in (UpdateState.COMMITTED, UpdateState.ROLLED_BACK))
    finally:
        rig.updater.stop()
    assert record.state is UpdateState.COMMITTED, record.reason
    assert record.active is not None and record.active.package_id == pkg_id(pkg_v1)
    assert not rig.feeder.requests  # nothing asked of a fleet
    assert parse_signed_manifest((rig.state_dir / "manifests" / f"{pkg_id(pkg_v1)}.pb").read_bytes()) == (
        signed_manifest(pkg_v1)
    )


# -- the on-device quality check and adapter packages -----------------------------------------------
def test_golden_answers_that_differ_commit_and_report_the_score(
    rig: Rig, pkg_v1: Path, tmp_path: Path, signing_key: tuple[Path, Path]
) -> None:
    """The device does not judge the reference comparison itself: it commits and reports the score;
    the fleet's quality gate decides for the wave."""
    from slmops_testing.packages import repackage

    record = install(rig, pkg_v1, 1)
    judged = len(manifest_of(pkg_v1).golden_prompts)
    assert record.state is UpdateState.COMMITTED and record.test is not None
    assert (record.test.ran, record.test.passed, record.test.judged, record.test.matched) == (
        True,
        True,
        judged,
        judged,
    )
    wrong = repackage(pkg_v1, tmp_path / "wrong", signing_key[0], version="1.0.1", references="never said")
    record = install(rig, wrong, 2)
    assert record.state is UpdateState.COMMITTED and rig.serving() == "1.0.1"
    assert record.test is not None and (record.test.judged, record.test.matched, record.test.passed) == (
        judged,
        0,
        True,
    )
    final = [r for r in rig.reports if r.generation == 2 and r.state is UpdateState.COMMITTED][-1]
    msg = report_to_pb(final, DEVICE)
    assert msg.HasField("test") and (msg.test.ran, msg.test.judged, msg.test.matched) == (True, judged, 0)
    # The result survives a restart (it is part of the persisted record) and a new target clears it.
    assert StateStore(rig.state_dir / "state.json").load().test == record.test
    rig.feeder.add(pkg_v1)
    rig.desired(pkg_v1, 3)
    record = rig.wait_done(3)
    assert record.test is not None and record.test.matched == judged


def _adapter_package(
    tmp_path: Path, key: Path, base_id: str, name: str = "lora", data: bytes = b"not an adapter"
) -> Path:
    from slmops_builder.keys import load_private_key
    from slmops_builder.packaging import PackageSpec, write_package

    src = tmp_path / f"{name}-src"
    src.mkdir()
    (src / f"{name}.onnx_adapter").write_bytes(data)
    spec = PackageSpec(
        name=name,
        version="0.1.0",
        profile=manifest_pb2.HardwareProfile(name="cpu-int4", execution_provider="cpu"),
        kind="adapter",
        adapters=[manifest_pb2.Adapter(name=name, base_package_id=base_id, path=f"{name}.onnx_adapter")],
    )
    return write_package(src, spec, load_private_key(key), tmp_path / name).path


def test_an_adapter_for_another_base_is_refused(
    rig: Rig, pkg_v1: Path, pkg_v2: Path, tmp_path: Path, signing_key: tuple[Path, Path]
) -> None:
    adapter = _adapter_package(tmp_path, signing_key[0], pkg_id(pkg_v2))
    rig.desired(adapter, 1)
    record = rig.wait_done(1)
    assert record.state is UpdateState.ROLLED_BACK and record.reason.endswith("this device runs no model"), (
        record.reason
    )
    install(rig, pkg_v1, 2)
    rig.desired(adapter, 3)
    record = rig.wait_done(3)
    assert record.state is UpdateState.ROLLED_BACK and record.test is None
    assert record.reason == (
        f"adapter 'lora' is bound to base package {pkg_id(pkg_v2)[:12]}; this device runs {pkg_id(pkg_v1)[:12]} "
        "(tiny-llama 1.0.0)"
    )
    assert rig.serving() == "1.0.0" and record.slots["b"] is None


def test_an_adapter_on_its_base_fetches_only_its_file_and_is_tested_with_the_base(
    rig: Rig, pkg_v1: Path, tmp_path: Path, signing_key: tuple[Path, Path]
) -> None:
    """A base without LoRA inputs cannot load an adapter: TESTING fails and the device rolls back,
    after fetching only the adapter's blob and staging it next to the base's files."""
    install(rig, pkg_v1, 1)
    adapter = _adapter_package(tmp_path, signing_key[0], pkg_id(pkg_v1))
    rig.feeder.add(adapter)
    rig.feeder.requests.clear()
    rig.desired(adapter, 2)
    record = rig.wait_done(2)
    assert rig.states(2) == ["FETCHING", "VERIFYING", "STAGED", "TESTING", "ROLLED_BACK"], record.reason
    assert {w.sha256 for w in rig.feeder.requests} == {f.sha256 for f in manifest_of(adapter).files}
    assert record.reason.startswith("TESTING: ") and "budget" not in record.reason, record.reason
    assert record.test is not None and record.test.ran and not record.test.passed and record.test.adapter == "lora"
    assert rig.serving() == "1.0.0" and record.active_slot == "a"
    # The adapter package's blob was kept only while it was the target; the base's blobs stay.
    assert all((rig.state_dir / "blobs" / f.sha256).exists() for f in manifest_of(pkg_v1).files)


def test_an_adapter_package_commits_next_to_its_base_and_rolls_back_to_it(
    tmp_path: Path, trusted_hex: str, adapter_pair: tuple[Path, Path]
) -> None:
    base, adapter = adapter_pair
    rig = Rig(tmp_path / "state", trusted_hex)
    rig.updater.start()
    try:
        assert install(rig, base, 1).state is UpdateState.COMMITTED
        rig.feeder.requests.clear()
        record = install(rig, adapter, 2)
        assert record.state is UpdateState.COMMITTED, record.reason
        assert record.test is not None and record.test.passed and record.test.adapter == "lora"
        assert {w.sha256 for w in rig.feeder.requests} == {f.sha256 for f in manifest_of(adapter).files}
        active = record.active
        assert active is not None and active.package_id == pkg_id(adapter) and active.base_package_id == pkg_id(base)
        slot = rig.state_dir / "slots" / record.active_slot
        assert (slot / "lora.onnx_adapter").is_file() and (slot / "genai_config.json").is_file()
        model = rig.host.model
        assert model is not None and model.info.adapters == ("lora",) and model.info.version == "0.1.0"
        result = rig.host.generate(GenerationRequest(messages=(("user", "Hi"),), max_new_tokens=3, adapter="lora"))
        assert result.completion_tokens >= 1
        # The base's blobs are kept while an adapter on it serves; desiring the base again rolls the adapter
        # back to it with nothing fetched.
        rig.feeder.requests.clear()
        record = install(rig, base, 3)
        assert record.state is UpdateState.COMMITTED and record.active is not None
        assert record.active.package_id == pkg_id(base) and not rig.feeder.requests
        assert rig.host.model is not None and rig.host.model.info.adapters == ()
    finally:
        rig.updater.stop()

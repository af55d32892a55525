"""The update state machine: IDLE -> FETCHING -> VERIFYING -> STAGED -> TESTING -> COMMITTED,
ROLLED_BACK from any. One worker thread runs it; MQTT callbacks only enqueue events.

TESTING (`smoke_test`) loads the staged slot and runs the manifest's golden prompts greedily within
the latency budget. A load failure, a failing prompt or a blown budget rolls back here, on the
device. A prompt whose output differs from the builder's reference does NOT: exact-match references
legitimately differ across precisions and providers, so the device commits, reports the count of
matching prompts (`ReportedState.test`) and the fleet's quality gate (`min_quality_score`) decides
for the whole wave, rolling the canaries back when they score below the threshold.

Adapter packages (kind "adapter", one `Adapter{name, base_package_id, path}`) are accepted only on
top of their base: the base must be the active package (or the base of the active adapter
package). Only the adapter's files are fetched; the inactive slot is staged with the base's files
plus the adapter's, loaded with the adapter (`ModelInfo.adapter_files`), and TESTING runs the
adapter's golden prompts with the adapter active. Committing flips slots as for a model. The slot
keeps every adapter package the active slot served on the same base (`Manifests.keeps`: one of
the same adapter name is replaced, which is how an adapter is updated), so adapters arrive one by
one and all stay resident; a request picks one by name. The desired state that names the base
again serves it without any adapter (removes them all); `remove_adapter` removes one.

Each state's record is saved (atomically) before its side effect runs; `recover()` applies the
recovery table (`update_record`) at start-up. Two slots (`slots`): the new package is staged in the
inactive one and only the COMMITTED record makes it the active one.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmops_agent.blob_store import BlobStore, Chunk, InsufficientSpace
from slmops_agent.errors import AgentError, BlobError, ModelLoadError, PackageRejected
from slmops_agent.layout import StateLayout, write_atomic
from slmops_agent.runtime.host import ModelHost
from slmops_agent.runtime.model import LoadedModel, load_model
from slmops_agent.settings import AgentSettings
from slmops_agent.update import slots
from slmops_agent.update.events import (
    ChunkEvent,
    ConnectedEvent,
    DesiredEvent,
    Event,
    RemoveAdapterEvent,
    StopEvent,
)
from slmops_agent.update.fetcher import BlobFetcher, ChunkOutcome, FetchFailed
from slmops_agent.update.messages import BlobWant, Desired, Report, forged_generation
from slmops_agent.update.packages import Manifests, Target, read_package
from slmops_agent.update.smoke_test import SmokeResult, run_smoke_test, summarize
from slmops_agent.update_record import (
    MAX_TEST_ATTEMPTS,
    MAX_TRANSITIONS_PER_TARGET,
    RECOVERY,
    TERMINAL,
    Recovery,
    SlotInfo,
    StateError,
    StateStore,
    TestSummary,
    UpdateRecord,
    check_transition,
)
from slmops_protos.manifests import BLOBS_DIR, PackageError, package_id
from slmops_protos.package.v1 import manifest_pb2
from slmops_protos.states import UpdateState

if TYPE_CHECKING:  # cryptography is imported when a signature is checked
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1024 * 1024
PROGRESS_REPORT_S = 5.0  # while fetching, a progress report at most this often


class Updater:
    """Owns state.json, the blob store and the slots; hot-swaps the host's model on COMMITTED."""

    def __init__(
        self,
        layout: StateLayout,
        settings: AgentSettings,
        host: ModelHost,
        *,
        trusted_keys: Sequence[Ed25519PublicKey],
        retired_keys: Sequence[Ed25519PublicKey] | None = None,
        device_id: str = "",
        on_report: Callable[[Report], None] | None = None,
        on_blob_request: Callable[[BlobWant], None] | None = None,
        is_connected: Callable[[], bool] | None = None,
        loader: Callable[..., LoadedModel] = load_model,
        providers: list[str] | None = None,
        memory_bytes: int | None = None,
    ) -> None:
        layout.create()
        self.layout = layout
        self.settings = settings
        self.host = host
        self.device_id = device_id
        self.on_report = on_report
        self.is_connected = is_connected or (lambda: True)
        self.loader = loader
        self.providers = providers
        self.memory_bytes = memory_bytes
        self.manifests = Manifests(layout.manifests, trusted_keys, retired_keys or [])
        self.store = BlobStore(layout.blobs, flush_interval_s=settings.bitmap_flush_s)
        self.fetcher = BlobFetcher(
            self.store, settings, on_blob_request=on_blob_request, is_connected=self.is_connected
        )
        self.states = StateStore(layout.state_json)
        self.record = self.states.load()
        self.history: collections.deque[UpdateState] = collections.deque(maxlen=256)
        self._events: queue.Queue[Event] = queue.Queue()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._target: Target | None = None
        self._last_progress_report = 0.0
        self._recovered = threading.Event()
        self.last_smoke_test: list[SmokeResult] = []

    # -- public, thread-safe -----------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="slmops-updater", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self._events.put(StopEvent())
        self._thread.join(timeout)
        self._thread = None

    def submit_desired(self, desired: Desired) -> None:
        self._events.put(DesiredEvent(desired))

    def install_local(self, package_dir: Path) -> None:
        """Install a package folder from disk (side-load): the same checks and states as a fleet update."""
        signed, _ = read_package(package_dir)
        desired = Desired(
            device_id=self.device_id,
            generation=self.record.generation,
            package_id=package_id(signed.manifest),
            signed_manifest=signed.SerializeToString(),
        )
        self._events.put(DesiredEvent(desired, local_dir=package_dir))

    def remove_adapter(self, name: str, timeout: float) -> Report:
        """Stop serving adapter `name` (NotFound if the active slot has none of that name), keeping
        the slot's other adapters: the slot is restaged without it, tested and committed like an
        update (no fetch: every file is here). The report once it committed or rolled back."""
        started: concurrent.futures.Future[str] = concurrent.futures.Future()
        writes = self.record.writes
        self._events.put(RemoveAdapterEvent(name, started))
        pid = started.result(timeout)
        self.wait_for(
            lambda r: r.writes > writes and r.target_package_id == pid and r.state in TERMINAL,
            timeout,
        )
        return self.current_report()

    def set_keys(self, trusted: Sequence[Ed25519PublicKey], retired: Sequence[Ed25519PublicKey]) -> None:
        """Trust these signing keys from now on (a key statement was applied)."""
        self.manifests.set_keys(trusted, retired)

    def submit_chunk(self, chunk: Chunk) -> None:
        if chunk.blob_sha256 in self.fetcher.wanted:
            self._events.put(ChunkEvent(chunk))

    def wants(self, sha256: str) -> bool:
        return sha256 in self.fetcher.wanted

    def notify_connected(self) -> None:
        self._events.put(ConnectedEvent())

    def current_report(self) -> Report:
        r = self.record
        received = r.bytes_received
        if r.state is UpdateState.FETCHING and self.fetcher.fetches:
            received = max(0, r.bytes_needed - (self.fetcher.bytes_needed - self.fetcher.bytes_received))
        return Report.of(r, bytes_received=received)

    def wait_for(self, predicate: Callable[[UpdateRecord], bool], timeout: float) -> UpdateRecord:
        """Block until the record satisfies `predicate`; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.record):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"update state is {self.record.state.value} ({self.record.reason})")
                self._cond.wait(left)
            return self.record

    def wait_recovered(self, timeout: float) -> bool:
        return self._recovered.wait(timeout)

    # -- the worker ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.recover()
        except Exception as exc:
            log.exception("recovery failed")
            if self.record.state not in TERMINAL:
                self._rollback(f"recovery after a restart failed: {type(exc).__name__}: {exc}")
        finally:
            self._recovered.set()
        while True:
            try:
                event: Event | None = self._events.get(timeout=0.25)
            except queue.Empty:
                event = None
            if isinstance(event, StopEvent):
                break
            try:
                if event is not None:
                    self._handle(event)
                if self.record.state is UpdateState.FETCHING:
                    self.fetcher.tick()
            except Exception as exc:
                log.exception("update step failed")
                if self.record.state not in TERMINAL:
                    self._rollback(f"internal error: {type(exc).__name__}: {exc}")
        self.fetcher.close()

    def _handle(self, event: Event) -> None:
        if isinstance(event, DesiredEvent):
            self._on_desired(event.desired, event.local_dir)
        elif isinstance(event, ChunkEvent):
            self._on_chunk(event.chunk)
        elif isinstance(event, ConnectedEvent):
            self.fetcher.reconnected()
            self._report()
        elif isinstance(event, RemoveAdapterEvent):
            try:
                pid = self._remove_adapter(event.name)
            except AgentError as exc:
                event.started.set_exception(exc)
            else:
                event.started.set_result(pid)

    # -- recovery ------------------------------------------------------------------------------
    def recover(self) -> None:
        """Apply the recovery table for the state found in state.json, and load the active slot."""
        r = self.record
        action = RECOVERY[r.state]
        log.info("start-up in %s: %s", r.state.value, action.value)
        slots.clean_staging_leftovers(self.layout)
        slots.point_current(self.layout, self.record.active_slot)
        self._load_active()
        if action in (Recovery.NOTHING, Recovery.FINISH_COMMIT):
            self._report()
            return
        if action is Recovery.FINISH_ROLLBACK:
            slots.wipe_failed_slot(self.layout, self.record)
            self._report()
            return
        try:
            manifest = self.manifests.read(r.target_package_id, installed=False)
            keeps = self.manifests.keeps(manifest, r.active)
            self._target = self.manifests.target_of(r.target_package_id, manifest, keeps)
        except PackageRejected as exc:
            self._rollback(f"after a restart in {r.state.value}: {exc.reason}")
            return
        if action is Recovery.RESUME_FETCH:
            self._enter(UpdateState.FETCHING)
            self._fetch()
        elif action is Recovery.VERIFY_AGAIN:
            self._verify_stage_test()
        elif action is Recovery.STAGE_AGAIN:
            self._stage_test()
        elif action is Recovery.TEST_AGAIN_ONCE:
            if r.test_attempts >= MAX_TEST_ATTEMPTS:
                self._rollback(f"the agent stopped {r.test_attempts} times while testing the package")
            else:
                self._test_commit()

    def _load_active(self) -> None:
        r = self.record
        info = r.active
        if info is None:
            return
        try:
            self.host.swap(self._load_slot(r.active_slot, info))
            return
        except (ModelLoadError, PackageRejected) as exc:
            log.error("the active slot %s does not load: %s", r.active_slot, exc)
            reason = f"active slot {r.active_slot} failed to load: {exc}"
        other = r.inactive_slot
        other_info = r.slots.get(other)
        if other_info is not None and r.state in TERMINAL:
            try:
                loaded = self._load_slot(other, other_info)
            except (ModelLoadError, PackageRejected) as exc:
                log.error("the other slot %s does not load either: %s", other, exc)
            else:
                self._enter(UpdateState.ROLLED_BACK, active_slot=other, reason=reason + f"; serving slot {other}")
                slots.point_current(self.layout, self.record.active_slot)
                self.host.swap(loaded)

    def _load_slot(self, slot: str, info: SlotInfo) -> LoadedModel:
        target = self.manifests.target(info.package_id, resident=info.adapters)
        return self.loader(self.layout.slot(slot), target.model_info(slot), **self.settings.model_options())

    # -- desired state ---------------------------------------------------------------------------
    def _on_desired(self, d: Desired, local_dir: Path | None) -> None:
        r = self.record
        if local_dir is None:
            if d.device_id and self.device_id and d.device_id != self.device_id:
                log.warning("dropped a desired state for device %s (this is %s)", d.device_id, self.device_id)
                return
            if d.generation <= r.generation:
                log.debug("ignored desired generation %d (handled %d)", d.generation, r.generation)
                return
            forged = forged_generation(d.generation, r.generation)
            if forged:
                log.warning("refused desired generation %d: %s", d.generation, forged)
                return
        if d.package_id is None:
            self._save(replace(r, generation=d.generation, rollout_id=d.rollout_id))
            self._report()
            return
        try:
            manifest = self.manifests.check_desired(
                d, r.active, providers=self.providers, memory_bytes=self.memory_bytes, security_floor=r.security_version
            )
        except PackageRejected as exc:
            log.warning("package %s rejected: %s", d.package_id[:12], exc.reason)
            self._abandon()
            self._rollback(
                exc.reason,
                generation=d.generation,
                rollout_id=d.rollout_id,
                target_package_id=d.package_id,
                target_version="",
                target_slot="",
                test=None,
                bytes_needed=0,
                bytes_received=0,
            )
            return
        active = r.active
        if active is not None and active.package_id == d.package_id:
            self._abandon()
            self._enter(
                UpdateState.COMMITTED,
                generation=d.generation,
                rollout_id=d.rollout_id,
                target_package_id=d.package_id,
                target_version=active.version,
                target_slot=r.active_slot,
                reason="",
                bytes_needed=0,
                bytes_received=0,
            )
            return
        if r.state is UpdateState.FETCHING and r.target_package_id == d.package_id and local_dir is None:
            self._save(replace(r, generation=d.generation, rollout_id=d.rollout_id))
            self._report()
            return
        self._abandon()
        self._start(d, manifest, local_dir)

    def _remove_adapter(self, name: str) -> str:
        """Start restaging the active slot without adapter `name`: the last other adapter package
        becomes the slot's package (the base when none is left). Returns that package's id. The
        record does not say what is being removed: after a restart mid-way, recovery stages the
        slot with every adapter the active slot serves (the removal is undone, not half-done)."""
        r = self.record
        active = r.active
        if r.state not in TERMINAL:
            raise AgentError(f"an update is in progress ({r.state.value}); remove the adapter after it")
        pid, keep = self.manifests.without_adapter(name, active)
        signed = (self.layout.manifests / f"{pid}.pb").read_bytes()
        d = Desired(device_id=self.device_id, generation=r.generation, package_id=pid, signed_manifest=signed)
        log.info("removing adapter %r: the slot now serves %s", name, pid[:12])
        self._abandon()
        self._start(d, self.manifests.read(pid), None, resident=keep)
        return pid

    def _start(
        self,
        d: Desired,
        manifest: manifest_pb2.Manifest,
        local_dir: Path | None,
        *,
        resident: tuple[str, ...] | None = None,
    ) -> None:
        """FETCHING for `d`; `resident`: the adapter packages the slot keeps (default: `Manifests.keeps`)."""
        assert d.package_id is not None
        pid = d.package_id
        write_atomic(self.layout.manifests / f"{pid}.pb", d.signed_manifest)
        if resident is None:
            resident = self.manifests.keeps(manifest, self.record.active)
        self._target = self.manifests.target_of(pid, manifest, resident)
        missing = sum(size for sha, size in self._target.blobs.items() if not self.store.has(sha))
        r = self.record
        self._enter(
            UpdateState.FETCHING,
            generation=d.generation,
            rollout_id=d.rollout_id,
            target_package_id=pid,
            target_version=manifest.version,
            target_slot=r.inactive_slot,
            chunk_size=d.chunk_size or r.chunk_size or DEFAULT_CHUNK_SIZE,
            local_source=str(local_dir.absolute()) if local_dir is not None else "",
            bytes_needed=missing,
            bytes_received=0,
            reason="",
            test=None,
            test_attempts=0,
            transitions=1,
        )
        try:
            self.store.check_space(self.store.bytes_to_fetch(self._target.blobs), self.settings.disk_reserve_bytes)
        except InsufficientSpace as exc:
            self._rollback(str(exc))
            return
        self._fetch()

    def _fetch(self) -> None:
        """FETCHING's side effect: import a side-loaded package's blobs, or ask the fleet for the missing ones."""
        assert self._target is not None
        local = self.record.local_source
        if local:
            for f in self._target.manifest.files:
                try:
                    self.store.import_file(Path(local) / BLOBS_DIR / f.sha256, f.sha256, f.size)
                except FileNotFoundError:
                    self._rollback(f"{f.path}: blob {f.sha256[:12]} is missing from {local}")
                    return
                except BlobError as exc:
                    self._rollback(f"{f.path}: {exc}")
                    return
        target = self._target
        self.fetcher.open(target.blobs, self.record.chunk_size or DEFAULT_CHUNK_SIZE, target.path_of)
        if not self.fetcher.fetches:
            self._after_fetch()

    def _on_chunk(self, chunk: Chunk) -> None:
        if self.record.state is not UpdateState.FETCHING:
            return
        try:
            outcome = self.fetcher.on_chunk(chunk)
        except FetchFailed as exc:
            self._rollback(exc.reason)
            return
        if outcome is ChunkOutcome.COMPLETE:
            self._after_fetch()
        elif outcome is ChunkOutcome.PROGRESS:
            now = time.monotonic()
            if now - self._last_progress_report >= PROGRESS_REPORT_S:
                self._last_progress_report = now
                self._report()

    def _abandon(self) -> None:
        """Stop the download in progress (its partial files stay until the next clean-up)."""
        self.fetcher.clear()
        self._target = None

    def _after_fetch(self) -> None:
        self.fetcher.clear()
        self._verify_stage_test()

    # -- verifying, staging, testing, committing ------------------------------------------------
    def _verify_stage_test(self) -> None:
        assert self._target is not None
        self._enter(UpdateState.VERIFYING, bytes_received=self.record.bytes_needed)
        for f in self._target.manifest.files:
            why = self.store.verify(f.sha256, f.size)
            if why is not None:
                self.store.remove(f.sha256)
                self._rollback(f"{f.path}: {why}")
                return
        self._stage_test()

    def _stage_test(self) -> None:
        assert self._target is not None
        r = self.record
        slot = r.target_slot
        if not slot or slot == r.active_slot:
            raise StateError(f"cannot stage into slot {slot!r} (active: {r.active_slot!r})")
        self._enter(UpdateState.STAGED, slots={**r.slots, slot: None})
        try:
            slots.stage(self.layout, self.store, slot, self._target.files)
        except (OSError, PackageError) as exc:
            self._rollback(f"staging into slot {slot} failed: {exc}")
            return
        self._test_commit()

    def _test_commit(self) -> None:
        assert self._target is not None
        r = self.record
        self._enter(UpdateState.TESTING, test_attempts=r.test_attempts + 1)
        target, slot = self._target, r.target_slot
        self.last_smoke_test = []

        def load() -> LoadedModel:
            return self.loader(self.layout.slot(slot), target.model_info(slot), **self.settings.model_options())

        t0 = time.perf_counter()
        try:
            loaded = run_smoke_test(load, target, self.settings, self.last_smoke_test)
        except PackageRejected as exc:
            self._rollback(exc.reason, test=self._summary(False, time.perf_counter() - t0))
            return
        self._commit(loaded, self._summary(True, time.perf_counter() - t0))

    def _summary(self, passed: bool, seconds: float) -> TestSummary:
        adapter = self._target.adapter if self._target is not None else ""
        return summarize(self.last_smoke_test, passed=passed, seconds=seconds, adapter=adapter)

    def _commit(self, loaded: LoadedModel, test: TestSummary) -> None:
        assert self._target is not None
        r = self.record
        slot = r.target_slot
        t = self._target
        profile = (t.base if t.base is not None else t.manifest).profile.name
        info = SlotInfo(t.package_id, t.manifest.name, t.manifest.version, profile, t.base_id, t.resident_ids)
        floor = max(r.security_version, t.manifest.security_version)
        self._enter(
            UpdateState.COMMITTED,
            active_slot=slot,
            slots={**r.slots, slot: info},
            reason="",
            test=test,
            security_version=floor,
            report=False,
        )
        slots.point_current(self.layout, self.record.active_slot)
        self.host.swap(loaded)
        self._target = None
        self._gc()
        self._report()

    def _rollback(self, reason: str, **changes: Any) -> None:
        log.warning("ROLLED_BACK: %s", reason)
        if self.record.state is UpdateState.FETCHING and "bytes_received" not in changes:
            changes["bytes_received"] = self.current_report().bytes_received  # how far the download got
        self._abandon()
        self._enter(UpdateState.ROLLED_BACK, reason=reason, report=False, **changes)
        slots.wipe_failed_slot(self.layout, self.record)
        self._gc()
        self._report()

    # -- records, reports, files ----------------------------------------------------------------
    def crash(self) -> None:
        """Fault injection (settings.crash_after_state): die at once, as a power cut would."""
        os.kill(os.getpid(), signal.SIGKILL)

    def _enter(self, state: UpdateState, *, report: bool = True, **changes: Any) -> None:
        r = self.record
        if state is not r.state:
            check_transition(r.state, state)
        transitions = changes.pop("transitions", r.transitions + 1)
        if transitions > MAX_TRANSITIONS_PER_TARGET and state is not UpdateState.ROLLED_BACK:
            self._rollback(f"update loop: {transitions} state changes for one package")
            return
        self._save(replace(r, state=state, transitions=transitions, **changes))
        self.history.append(state)
        if self.settings.crash_after_state == state.value:
            log.warning("fault injection: crash after saving %s", state.value)
            self.crash()
        log.info("update state %s %s", state.value, self.record.reason)
        if report:
            self._report()

    def _save(self, record: UpdateRecord) -> None:
        saved = self.states.save(record)
        with self._cond:
            self.record = saved
            self._cond.notify_all()

    def _report(self) -> None:
        if self.on_report is None:
            return
        try:
            self.on_report(self.current_report())
        except Exception:
            log.exception("could not report the update state")

    def _gc(self) -> None:
        """Keep the blobs and manifests of the packages in the slots (and of a target in progress)."""
        keep_ids = {s.package_id for s in self.record.slots.values() if s is not None}
        keep_ids |= {s.base_package_id for s in self.record.slots.values() if s is not None and s.base_package_id}
        keep_ids |= {pid for s in self.record.slots.values() if s is not None for pid in s.adapters}
        if self._target is not None:
            keep_ids |= {self._target.package_id, self._target.base_id, *self._target.resident_ids} - {""}
        slots.collect_garbage(self.layout, self.store, self.manifests, keep_ids)

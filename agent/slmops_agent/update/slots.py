"""The two slot folders and what is kept on disk: staging a package's files into a slot, the
`current` symlink, wiping a half-staged slot, and freeing the blobs and manifests no slot uses."""

from __future__ import annotations

import logging
import os
import shutil

from slmops_agent.blob_store import BlobStore
from slmops_agent.errors import PackageRejected
from slmops_agent.layout import StateLayout, fsync_dir
from slmops_agent.update.packages import Manifests
from slmops_agent.update_record import UpdateRecord
from slmops_protos.manifests import PackageError, safe_relpath
from slmops_protos.package.v1 import manifest_pb2

log = logging.getLogger(__name__)


def stage(layout: StateLayout, store: BlobStore, slot: str, files: list[manifest_pb2.FileEntry]) -> None:
    """Fill `slot` with `files` (hard links to the blobs, copies where links fail), atomically: the
    files go to `<slot>.staging`, which then replaces the slot."""
    dest = layout.slot(slot)
    tmp = dest.with_name(f"{slot}.staging")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    root = tmp.resolve()
    for f in files:
        rel = safe_relpath(f.path)
        out = tmp.joinpath(*rel.parts)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not out.parent.resolve().is_relative_to(root):
            raise PackageError(f"unsafe file path in manifest: {f.path!r}")
        src = store.path(f.sha256)
        try:
            os.link(src, out)
        except OSError:
            shutil.copyfile(src, out)
    fsync_dir(tmp)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


def point_current(layout: StateLayout, active_slot: str) -> None:
    """`current` -> slots/<active> (atomic symlink swap); absent while nothing is active."""
    link = layout.current
    if not active_slot:
        if link.is_symlink():
            link.unlink()
        return
    target = os.path.join("slots", active_slot)
    if link.is_symlink() and os.readlink(link) == target:
        return
    tmp = link.with_name(".current.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def wipe_failed_slot(layout: StateLayout, record: UpdateRecord) -> None:
    """Remove the record's target slot if it was being staged (it holds no package yet)."""
    slot = record.target_slot
    if slot and slot != record.active_slot and record.slots.get(slot) is None:
        shutil.rmtree(layout.slot(slot), ignore_errors=True)
        shutil.rmtree(layout.slots / f"{slot}.staging", ignore_errors=True)


def clean_staging_leftovers(layout: StateLayout) -> None:
    for entry in layout.slots.glob("*.staging"):
        shutil.rmtree(entry, ignore_errors=True)


def collect_garbage(layout: StateLayout, store: BlobStore, manifests: Manifests, keep_ids: set[str]) -> None:
    """Keep the blobs and manifests of the packages `keep_ids` (a package whose manifest cannot be
    read keeps no blobs)."""
    keep_blobs: set[str] = set()
    for pid in keep_ids:
        try:
            keep_blobs.update(f.sha256 for f in manifests.read(pid).files)
        except PackageRejected:
            continue
    freed = store.gc(keep_blobs)
    for entry in layout.manifests.iterdir():
        if entry.name.endswith(".pb") and entry.name[:-3] not in keep_ids:
            entry.unlink(missing_ok=True)
    if freed:
        log.info("freed %d bytes of blobs no slot uses", freed)

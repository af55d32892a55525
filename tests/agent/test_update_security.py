"""Rollback protection and key rotation on the device, through the update rig (the real updater,
packages and onnxruntime-genai; no fleet): a package below the committed security version is
refused before anything is fetched and the device keeps serving; a rollback within one security
version works; after a key statement a package signed by the retired key is refused, one signed
by the new key installs, and the package already serving keeps loading after a restart."""

from __future__ import annotations

from pathlib import Path

import pytest
from update_rig import Rig, install

from slmops_agent.update_record import StateStore
from slmops_builder.keys import generate_key
from slmops_protos.manifests import DOWNGRADE_REFUSED
from slmops_protos.states import UpdateState
from slmops_testing.packages import repackage


@pytest.fixture(scope="module")
def versions(
    pkg_v1: Path, pkg_v2: Path, signing_key: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """1.0.0 and 2.0.0 at security version 1, 3.0.0 at security version 2 (the tiny model's files)."""
    root = tmp_path_factory.mktemp("security-versions")
    key = signing_key[0]
    return {
        "1.0.0": repackage(pkg_v1, root / "v1", key, version="1.0.0", security_version=1),
        "2.0.0": repackage(pkg_v2, root / "v2", key, version="2.0.0", security_version=1),
        "3.0.0": repackage(pkg_v1, root / "v3", key, version="3.0.0", security_version=2),
    }


def test_downgrade_below_the_security_version_is_refused_and_reported(rig: Rig, versions: dict[str, Path]) -> None:
    assert install(rig, versions["1.0.0"], 1).state is UpdateState.COMMITTED
    assert install(rig, versions["2.0.0"], 2).state is UpdateState.COMMITTED
    # the operator's rollback to an older release of the same security version is still possible
    record = install(rig, versions["1.0.0"], 3)
    assert record.state is UpdateState.COMMITTED, record.reason
    assert rig.serving() == "1.0.0" and record.security_version == 1
    record = install(rig, versions["3.0.0"], 4)
    assert record.state is UpdateState.COMMITTED and record.security_version == 2

    asked = len(rig.feeder.requests)
    record = install(rig, versions["2.0.0"], 5)
    assert record.state is UpdateState.ROLLED_BACK
    assert record.reason.startswith(DOWNGRADE_REFUSED)
    assert "security version 1" in record.reason and "committed security version 2" in record.reason
    assert rig.states(5) == ["ROLLED_BACK"]  # refused on the manifest: nothing fetched, nothing staged
    assert len(rig.feeder.requests) == asked
    report = rig.reports[-1]
    assert report.state is UpdateState.ROLLED_BACK and report.reason == record.reason
    assert report.active_version == "3.0.0" and rig.serving() == "3.0.0"
    assert record.security_version == 2

    # the floor is durable: after a restart the same downgrade is still refused
    rig.updater.stop()
    assert StateStore(rig.state_dir / "state.json").load().security_version == 2
    rig.new_updater().start()
    rig.wait(lambda r: r.state is UpdateState.ROLLED_BACK, 30)
    assert rig.serving() == "3.0.0"
    record = install(rig, versions["1.0.0"], 6)
    assert record.state is UpdateState.ROLLED_BACK and record.reason.startswith(DOWNGRADE_REFUSED)


def test_retired_key_refused_new_key_accepted_serving_package_kept(
    rig: Rig, versions: dict[str, Path], tmp_path: Path
) -> None:
    from slmops_builder.keys import load_public_key, public_path

    assert install(rig, versions["1.0.0"], 1).state is UpdateState.COMMITTED
    new_key = tmp_path / "new.key"
    generate_key(new_key)
    by_new = repackage(versions["1.0.0"], tmp_path / "by-new", new_key, version="2.0.0")
    old = rig.trusted[0]
    # before the statement the new key is unknown
    record = install(rig, by_new, 2)
    assert record.state is UpdateState.ROLLED_BACK and "untrusted" in record.reason

    # a key statement trusted the new key and retired the old one
    rig.trusted[:] = [load_public_key(public_path(new_key))]
    rig.retired[:] = [old]
    rig.updater.set_keys(rig.trusted, rig.retired)
    record = install(rig, versions["2.0.0"], 3)  # signed by the retired key
    assert record.state is UpdateState.ROLLED_BACK and "signed by a retired key" in record.reason
    assert rig.serving() == "1.0.0"
    record = install(rig, by_new, 4)
    assert record.state is UpdateState.COMMITTED, record.reason
    assert rig.serving() == "2.0.0"

    # the other slot's package (signed by the retired key) still loads after a restart, as does the
    # active one; but it cannot be installed again
    rig.updater.stop()
    rig.new_updater().start()
    rig.wait(lambda r: r.state is UpdateState.COMMITTED, 30)
    assert rig.serving() == "2.0.0"
    record = install(rig, versions["1.0.0"], 5)
    assert record.state is UpdateState.ROLLED_BACK and "signed by a retired key" in record.reason

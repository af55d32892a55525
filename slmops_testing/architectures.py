"""What the architecture matrix measures of a converted model against transformers (the test in
tests/builder/test_architectures.py and benchmarks/architecture_matrix.py both use these).

- `PROMPT`: the text whose token ids every model is run on (longer than the tiny models' sliding
  window, so the windowed layers of Mistral and the Gemmas are exercised).
- `hf_logits` / `onnx_logits`: the logits of every prompt position, transformers fp32 and an
  onnxruntime-genai folder.
- `hf_greedy` / `onnx_greedy`: `n` greedy tokens after the prompt.
- `agreement`: the fraction of positions where two token sequences hold the same token.
- `measure_all`: each architecture through the builder (a tiny model made from its config,
  imported from its HF folder and from a GGUF where transformers reads that architecture from GGUF,
  converted for `PROFILES`), every figure of its matrix row.

Tokens agree: at every prompt position, the token the converted model ranks first (its greedy next
token, given the same prefix) against the one transformers ranks first: the share of positions
where they agree. Free-running greedy text is also compared (`greedy`), but one early flip makes
every later position differ, so it measures where the first flip falls more than agreement.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "GREEDY_TOKENS",
    "PROFILES",
    "PROMPT",
    "ArchitectureRow",
    "agreement",
    "hf_greedy",
    "hf_logits",
    "measure_all",
    "onnx_greedy",
    "onnx_logits",
    "prompt_ids",
    "top1_agreement",
]

PROFILES = ("cpu-fp32", "cpu-int8", "cpu-int4")

PROMPT = (
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog. "
    "Small language models run on edge devices with ONNX Runtime."
)
GREEDY_TOKENS = 16


def prompt_ids(folder: Path) -> list[int]:
    """`PROMPT` in the token ids of the tokenizer in `folder` (its tokenizer.json)."""
    from tokenizers import Tokenizer

    return list(Tokenizer.from_file(str(Path(folder) / "tokenizer.json")).encode(PROMPT).ids)


def _hf_model(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model.eval()


def hf_logits(folder: Path, ids: Sequence[int]) -> np.ndarray:
    """transformers' fp32 logits (positions x vocabulary) of `ids`."""
    import torch

    with torch.no_grad():
        out = _hf_model(folder)(torch.tensor([list(ids)]))
    return np.asarray(out.logits[0].float().numpy())


def hf_greedy(folder: Path, ids: Sequence[int], n: int = GREEDY_TOKENS) -> list[int]:
    """`n` tokens transformers picks greedily after `ids` (never stopping at eos)."""
    import torch

    model = _hf_model(folder)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([list(ids)]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )
    return [int(t) for t in out[0, len(ids) :]]


def _og_model(folder: Path):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": 1}}}}))
    return og.Model(config)


def onnx_logits(folder: Path, ids: Sequence[int]) -> np.ndarray:
    """onnxruntime-genai's logits (positions x vocabulary) of `ids` in one prefill."""
    import onnxruntime_genai as og

    model = _og_model(folder)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids))
    gen = og.Generator(model, params)
    gen.append_tokens(list(ids))
    return np.asarray(gen.get_output("logits"))[0].copy()


def onnx_greedy(folder: Path, ids: Sequence[int], n: int = GREEDY_TOKENS) -> list[int]:
    """`n` tokens onnxruntime-genai picks greedily after `ids` (eos ignored: min_length)."""
    import onnxruntime_genai as og

    model = _og_model(folder)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(list(ids))
    out: list[int] = []
    while not gen.is_done() and len(out) < n:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """The fraction of positions of `a` where `b` holds the same token (0 for an empty `a`)."""
    return sum(1 for x, y in zip(a, b, strict=False) if x == y) / len(a) if a else 0.0


def top1_agreement(reference: np.ndarray, other: np.ndarray) -> float:
    """The share of positions (rows) where both logits rank the same token first."""
    return float(np.mean(reference.argmax(-1) == other.argmax(-1)))


@dataclass
class ArchitectureRow:
    """One architecture's row of the matrix: paths made and figures measured (None: not measured)."""

    architecture: str
    hf: Path
    imported: Path | None = None
    imported_as: str = ""
    gguf_imported: Path | None = None
    gguf_imported_as: str = ""
    gguf_tokens_match: bool | None = None
    gguf_max_diff: float | None = None
    gguf_refusal: str = ""  # why there is no GGUF import (the importer's refusal, or transformers')
    converted: dict[str, Path] = field(default_factory=dict)
    max_diff: dict[str, float] = field(default_factory=dict)  # profile -> max |logit - transformers'|
    top1: dict[str, float] = field(default_factory=dict)  # profile -> tokens agree (module doc)
    greedy: dict[str, float] = field(default_factory=dict)  # profile -> free-running greedy agreement
    generated: dict[str, int] = field(default_factory=dict)  # profile -> tokens generated
    logit_scale: float = 0.0  # max |logit| of transformers: what the differences compare against
    errors: dict[str, str] = field(default_factory=dict)  # step -> error (a cell that failed)
    seconds: float = 0.0  # since the matrix started, when this row was done


def _imports(architecture: str, root: Path) -> tuple[ArchitectureRow, list[int], np.ndarray, list[int]]:
    """A tiny model of `architecture` in `root` (fresh), its imports, and transformers' figures."""
    from slmops_builder.importer import ModelImportError, import_model
    from slmops_testing.tiny_gguf import GGUF_WRITABLE, write_tiny_gguf
    from slmops_testing.tiny_model import make_tiny_hf_model

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    row = ArchitectureRow(architecture, make_tiny_hf_model(root / "hf", architecture=architecture))
    ids = prompt_ids(row.hf)
    reference = hf_logits(row.hf, ids)
    row.logit_scale = float(np.abs(reference).max())
    greedy = hf_greedy(row.hf, ids)
    try:
        imported = import_model(row.hf, root / "imported", profiles=PROFILES)
        row.imported, row.imported_as = imported.path, imported.architecture
    except Exception as exc:
        row.errors["import"] = str(exc)
    if architecture in GGUF_WRITABLE:
        gguf_path = write_tiny_gguf(row.hf, root / "tiny.gguf")
        try:
            from_gguf = import_model(gguf_path, root / "from-gguf", profiles=PROFILES)
            row.gguf_imported, row.gguf_imported_as = from_gguf.path, from_gguf.architecture
            row.gguf_tokens_match = prompt_ids(from_gguf.path) == ids
            row.gguf_max_diff = float(np.abs(hf_logits(from_gguf.path, ids) - reference).max())
        except Exception as exc:
            row.errors["import-gguf"] = str(exc)
    else:
        try:
            import_model(gguf_header_only(architecture, root / "header.gguf"), root / "refused")
            row.errors["import-gguf"] = "a GGUF of an architecture transformers cannot load was not refused"
        except ModelImportError as exc:
            row.gguf_refusal = str(exc)
    return row, ids, reference, greedy


def _convert(row: ArchitectureRow, profile: str, cache_dir: Path) -> None:
    from slmops_builder.convert import convert
    from slmops_builder.profiles import get_profile

    assert row.imported is not None
    try:
        row.converted[profile] = convert(row.imported, get_profile(profile), cache_dir=cache_dir, threads=1).path
    except Exception as exc:
        row.errors[profile] = str(exc)


def _measure_converted(row: ArchitectureRow, ids: list[int], reference: np.ndarray, greedy: list[int]) -> None:
    for name, path in row.converted.items():
        logits = onnx_logits(path, ids)
        row.max_diff[name] = float(np.abs(logits - reference).max())
        row.top1[name] = top1_agreement(reference, logits)
        tokens = onnx_greedy(path, ids)
        row.generated[name] = len(tokens)
        row.greedy[name] = agreement(greedy, tokens)


def gguf_header_only(architecture: str, path: Path) -> Path:
    """A GGUF that names the llama.cpp architecture of `architecture` (its model type) and holds one
    tensor: enough for the importer's header check, which must refuse it."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture.removesuffix("ForCausalLM").lower())
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def measure_all(architectures: Sequence[str], root: Path, *, workers: int = 3) -> dict[str, ArchitectureRow]:
    """Run each architecture through the builder in `root` and measure its row. transformers and
    onnxruntime-genai run here one at a time (transformers' loading is not thread-safe: it creates
    weights on a meta device, globally); the conversions, subprocesses, run `workers` at a time."""
    import time

    start = time.monotonic()
    measured = {a: _imports(a, root / a) for a in architectures}
    cache = root / "cache"
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = [
            pool.submit(_convert, row, profile, cache)
            for row, *_ in measured.values()
            if row.imported is not None
            for profile in PROFILES
        ]
        for job in jobs:
            job.result()
    rows = {}
    for arch, (row, ids, reference, greedy) in measured.items():
        _measure_converted(row, ids, reference, greedy)
        row.seconds = time.monotonic() - start
        rows[arch] = row
    return rows

"""Every architecture the builder lists, through the builder: the matrix as a table (run by hand).

For each architecture a tiny random model is made from its transformers config (2 layers, or 6 for
Gemma 3; hidden 64; a 320-token BPE vocabulary), imported from its HF folder and from a GGUF where
transformers reads that architecture from GGUF, converted for cpu-fp32, cpu-int8 and cpu-int4 by
the builder's conversion engine, loaded in onnxruntime-genai and compared with transformers on an
86-token prompt (`slmops_testing.architectures`, which tests/builder/test_architectures.py asserts on):

    import HF     the architecture the import reports
    import GGUF   the class the GGUF imports as, and its logits' max |diff| to the source model; or
                  "refused": transformers has no GGUF loader for it, and the importer says so
    fp32..int4    max |logit - transformers'| over every prompt position (logits are ~0.3-1.5)
    tokens agree  per prompt position, does the converted model rank first the token transformers
                  ranks first: the share that agree (fp32 / int8 / int4)
    greedy        free-running: the share of 16 greedy tokens equal to transformers' (int4)

    python benchmarks/architecture_matrix.py [--json] [--only Gemma3ForCausalLM ...] [--workers 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from slmops_builder.architectures import ARCHITECTURES
from slmops_testing.architectures import PROFILES, ArchitectureRow, measure_all


def _cell(row: ArchitectureRow, profile: str) -> str:
    if profile in row.errors:
        return "FAILED"
    return f"{row.max_diff[profile]:.1e}"


def _gguf(row: ArchitectureRow) -> str:
    if "import-gguf" in row.errors:
        return "FAILED"
    if row.gguf_refusal:
        return "refused (no transformers GGUF loader)"
    tokens = "" if row.gguf_tokens_match else ", tokenizer differs"
    return f"{row.gguf_imported_as.removesuffix('ForCausalLM')}, {row.gguf_max_diff:.1e}{tokens}"


def to_json(row: ArchitectureRow) -> dict[str, object]:
    return {
        "architecture": row.architecture,
        "import_hf": row.imported_as,
        "import_gguf": row.gguf_imported_as,
        "gguf_max_diff": row.gguf_max_diff,
        "gguf_tokens_match": row.gguf_tokens_match,
        "gguf_refusal": row.gguf_refusal,
        "max_diff": row.max_diff,
        "tokens_agree": row.top1,
        "greedy_agree": row.greedy,
        "logit_scale": row.logit_scale,
        "errors": row.errors,
        "seconds": round(row.seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--only", nargs="+", choices=sorted(ARCHITECTURES), help="these architectures only")
    parser.add_argument("--workers", type=int, default=3, help="architectures measured side by side")
    args = parser.parse_args()
    archs = args.only or sorted(ARCHITECTURES)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="slmops-archs-") as tmp:
        rows = measure_all(archs, Path(tmp), workers=args.workers)
    if args.json:
        print(json.dumps([to_json(r) for r in rows.values()], indent=2))
        return
    head = ["architecture", "import HF", "import GGUF (max diff)", *(f"{p} max diff" for p in PROFILES)]
    head += ["tokens agree fp32/int8/int4", "greedy int4"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows.values():
        agree = "/".join(f"{row.top1[p]:.2f}" if p in row.top1 else "-" for p in PROFILES)
        greedy = f"{row.greedy['cpu-int4']:.2f}" if "cpu-int4" in row.greedy else "-"
        imported = "ok" if row.imported_as == row.architecture else row.errors.get("import", "FAILED")
        cells = [row.architecture, imported, _gguf(row), *(_cell(row, p) for p in PROFILES), agree, greedy]
        print("| " + " | ".join(cells) + " |")
    print(f"\n{len(rows)} architectures in {time.monotonic() - start:.0f} s", file=sys.stderr)
    for row in rows.values():
        for step, error in row.errors.items():
            print(f"{row.architecture} {step}: {error.splitlines()[0]}", file=sys.stderr)


if __name__ == "__main__":
    main()

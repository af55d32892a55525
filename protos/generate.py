"""Generate the Python code of the contract from the .proto files: the one way.

    python protos/generate.py           # (re)write protos/slmops_protos/{agent,fleet,package}/v1/
    python protos/generate.py --check   # exit 1 when the committed code differs

protoc writes modules named after the .proto paths (``slmops.agent.v1``); they are
installed as ``slmops_protos.agent.v1`` so that the import name is ours alone. This
script is the one place that rewrites the imports.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
OUT = HERE / "slmops_protos"
PROTOS = sorted(p.relative_to(HERE).as_posix() for p in (HERE / "slmops").rglob("*.proto"))
_IMPORT = re.compile(r"^(from|import) slmops\.", re.MULTILINE)
_QUALIFIED = re.compile(r"\bslmops\.(agent|fleet|package)\.v1\.(\w+_pb2)\b")


def _fix(text: str) -> str:
    text = _IMPORT.sub(r"\1 slmops_protos.", text)
    return _QUALIFIED.sub(r"slmops_protos.\1.v1.\2", text)


def generate() -> dict[Path, str]:
    """Run protoc into a scratch folder; return {path under OUT: text}."""
    with tempfile.TemporaryDirectory() as tmp:
        grpc_include = Path(protoc.__file__).parent / "_proto"
        # mypy-protobuf's plugins sit beside this interpreter, which need not be on PATH.
        bin_dir = str(Path(sys.executable).parent)
        plugins = []
        for name in ("protoc-gen-mypy", "protoc-gen-mypy_grpc"):
            path = shutil.which(name, path=bin_dir) or shutil.which(name)
            if path is None:
                raise SystemExit(f"{name} not found: pip install mypy-protobuf")
            plugins.append(f"--plugin={name}={path}")
        args = [
            "protoc",
            *plugins,
            f"-I{HERE}",
            f"-I{grpc_include}",
            f"--python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *PROTOS,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        files: dict[Path, str] = {}
        for src in sorted(Path(tmp, "slmops").rglob("*")):
            if src.is_file() and not (src.stem.endswith("_grpc") and "Stub" not in src.read_text()):
                rel = src.relative_to(Path(tmp, "slmops"))
                files[rel] = _fix(src.read_text())
        # every package folder gets an __init__.py
        for rel in list(files):
            for parent in rel.parents:
                if parent != Path("."):
                    files.setdefault(parent / "__init__.py", "")
        return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail when the committed code is stale")
    args = parser.parse_args()
    files = generate()
    stale = [rel for rel, text in files.items() if not (OUT / rel).exists() or (OUT / rel).read_text() != text]
    if args.check:
        for rel in stale:
            print(f"stale: protos/slmops_protos/{rel}", file=sys.stderr)
        if stale:
            print("run: python protos/generate.py", file=sys.stderr)
        return 1 if stale else 0
    for rel in stale:
        (OUT / rel).parent.mkdir(parents=True, exist_ok=True)
        (OUT / rel).write_text(files[rel])
        print(f"wrote protos/slmops_protos/{rel}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

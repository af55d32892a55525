"""The lineage file an import writes into a model folder (`SOURCE_FILE`) and its reader: here, apart
from the importer, so the conversion engines read it without importing the importer (which reads
the profiles, which list the engines)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["SOURCE_FILE", "read_source_info"]

SOURCE_FILE = "slmops_source.json"


def read_source_info(model_dir: Path) -> dict[str, Any] | None:
    """The lineage an import wrote, or None for a folder that was not imported by slmops."""
    path = model_dir / SOURCE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None

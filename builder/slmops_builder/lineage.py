"""A package's lineage (`manifest_pb2.Lineage`): where its weights came from and what made them.

One function for every path that builds a package (`slmops builder build`, a recipe's package step):
the base model and its SHA-256 (the import's record, else the folder itself), the recipe's hash, the
parent package, the engine and method, the versions of the tools that converted it (the model
builder's and the engine's own), a trained model's teacher and data hashes, and the task scores that
measure what the package kept of its teacher and float model (`task_scores`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from slmops_builder.engines import get_engine
from slmops_builder.importer import add_training_lineage, folder_sha256, read_source_info
from slmops_builder.profiles import Profile
from slmops_builder.steps import CONVERT_TOOLS, tool_versions
from slmops_protos.package.v1 import manifest_pb2

__all__ = ["package_lineage"]


def package_lineage(
    model_dir: Path,
    profile: Profile,
    *,
    recipe_sha256: str,
    parent_package_id: str = "",
    task_scores: Mapping[str, float] | None = None,
) -> manifest_pb2.Lineage:
    """The lineage of a package built for `profile` from the HF folder `model_dir`; `task_scores`:
    the task score of each model measured ("teacher", "student", "package"; see the proto)."""
    info = read_source_info(model_dir)
    if info and info.get("source_sha256"):
        base, digest = str(info.get("source", model_dir)), str(info["source_sha256"])
    else:  # a folder slmops did not import: the folder is the base
        base, digest = str(model_dir.resolve()), folder_sha256(model_dir)
    lineage = manifest_pb2.Lineage(
        base_model=base,
        base_model_sha256=digest,
        recipe_sha256=recipe_sha256,
        parent_package_id=parent_package_id,
        engine=profile.engine,
        quantization_method=profile.quantization_method,
    )
    lineage.tool_versions.update(tool_versions((*CONVERT_TOOLS, "torch", *get_engine(profile.engine).tools)))
    lineage.task_scores.update(task_scores or {})
    return add_training_lineage(lineage, model_dir, info)

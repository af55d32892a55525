"""The slmops contract: generated protobuf/gRPC code and the helpers every side shares.

Importing the package is cheap (every slmops process does, if only for the version): the helpers
load on first use.
"""

import importlib
from typing import TYPE_CHECKING, Any

# The one version of slmops: pyproject.toml reads it from here, and every program reports it.
__version__ = "0.1.0"

if TYPE_CHECKING:
    from slmops_protos.manifests import (
        PackageError,
        canonical_bytes,
        package_id,
        parse_signed_manifest,
        verify_signed_manifest,
    )
    from slmops_protos.providers import EXECUTION_PROVIDERS, ort_provider_name, provider_rank
    from slmops_protos.states import UpdateState
    from slmops_protos.topics import Topics, chunk_count

# name -> module: loaded on first use.
_EXPORTS = {
    "PackageError": "slmops_protos.manifests",
    "canonical_bytes": "slmops_protos.manifests",
    "package_id": "slmops_protos.manifests",
    "parse_signed_manifest": "slmops_protos.manifests",
    "verify_signed_manifest": "slmops_protos.manifests",
    "EXECUTION_PROVIDERS": "slmops_protos.providers",
    "ort_provider_name": "slmops_protos.providers",
    "provider_rank": "slmops_protos.providers",
    "UpdateState": "slmops_protos.states",
    "Topics": "slmops_protos.topics",
    "chunk_count": "slmops_protos.topics",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'slmops_protos' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "EXECUTION_PROVIDERS",
    "PackageError",
    "Topics",
    "UpdateState",
    "__version__",
    "canonical_bytes",
    "chunk_count",
    "ort_provider_name",
    "package_id",
    "parse_signed_manifest",
    "provider_rank",
    "verify_signed_manifest",
]

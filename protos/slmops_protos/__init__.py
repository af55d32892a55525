"""The slmops contract: generated protobuf/gRPC code and the helpers every side shares."""

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

# The one version of slmops: pyproject.toml reads it from here, and every program reports it.
__version__ = "0.1.0"

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

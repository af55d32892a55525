"""The slmops contract: generated protobuf/gRPC code and the helpers every side shares."""

from slmops_protos.manifests import (
    PackageError,
    canonical_bytes,
    package_id,
    parse_signed_manifest,
    verify_signed_manifest,
)
from slmops_protos.topics import Topics, chunk_count

__all__ = [
    "PackageError",
    "Topics",
    "canonical_bytes",
    "chunk_count",
    "package_id",
    "parse_signed_manifest",
    "verify_signed_manifest",
]
__version__ = "0.1.0"

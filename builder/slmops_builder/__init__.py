"""slmops builder: import, convert and quantize per hardware profile, evaluate, package and sign.

Importing this package is cheap: torch, transformers and onnxruntime-genai load only inside the
functions that need them (import_model, convert's subprocess, evaluate_folder).
"""

from typing import TYPE_CHECKING, Any

from slmops_protos import __version__

if TYPE_CHECKING:
    from slmops_builder.build import BuildEvent, GoldenPromptSpec, build_package, evaluate_folder
    from slmops_builder.convert import convert, parse_search_overrides, stage
    from slmops_builder.engines import ConversionError
    from slmops_builder.importer import ImportedModel, ModelImportError, import_model
    from slmops_builder.keys import KeyFileError, generate_key, load_private_key, load_public_key
    from slmops_builder.packaging import (
        PackageSpec,
        VerifiedPackage,
        WrittenPackage,
        read_manifest,
        unpack_package,
        verify_package,
        write_package,
    )
    from slmops_builder.profiles import PROFILES, Profile, UnknownProfileError, get_profile
    from slmops_builder.steps import StepCache, StepResult

# name -> module: loaded on first use, so `import slmops_builder.cli` stays cheap.
_EXPORTS = {
    "BuildEvent": "slmops_builder.build",
    "GoldenPromptSpec": "slmops_builder.build",
    "build_package": "slmops_builder.build",
    "evaluate_folder": "slmops_builder.build",
    "ConversionError": "slmops_builder.engines",
    "convert": "slmops_builder.convert",
    "parse_search_overrides": "slmops_builder.convert",
    "stage": "slmops_builder.convert",
    "ImportedModel": "slmops_builder.importer",
    "ModelImportError": "slmops_builder.importer",
    "import_model": "slmops_builder.importer",
    "KeyFileError": "slmops_builder.keys",
    "generate_key": "slmops_builder.keys",
    "load_private_key": "slmops_builder.keys",
    "load_public_key": "slmops_builder.keys",
    "PackageSpec": "slmops_builder.packaging",
    "VerifiedPackage": "slmops_builder.packaging",
    "WrittenPackage": "slmops_builder.packaging",
    "read_manifest": "slmops_builder.packaging",
    "unpack_package": "slmops_builder.packaging",
    "verify_package": "slmops_builder.packaging",
    "write_package": "slmops_builder.packaging",
    "PROFILES": "slmops_builder.profiles",
    "Profile": "slmops_builder.profiles",
    "UnknownProfileError": "slmops_builder.profiles",
    "get_profile": "slmops_builder.profiles",
    "StepCache": "slmops_builder.steps",
    "StepResult": "slmops_builder.steps",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'slmops_builder' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "PROFILES",
    "BuildEvent",
    "ConversionError",
    "GoldenPromptSpec",
    "ImportedModel",
    "KeyFileError",
    "ModelImportError",
    "PackageSpec",
    "Profile",
    "StepCache",
    "StepResult",
    "UnknownProfileError",
    "VerifiedPackage",
    "WrittenPackage",
    "__version__",
    "build_package",
    "convert",
    "evaluate_folder",
    "generate_key",
    "get_profile",
    "import_model",
    "load_private_key",
    "load_public_key",
    "parse_search_overrides",
    "read_manifest",
    "stage",
    "unpack_package",
    "verify_package",
    "write_package",
]

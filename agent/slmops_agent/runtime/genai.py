"""The runtime's one import of onnxruntime-genai, made when a model is loaded (importing the
runtime stays cheap: the CLI and the tests of other parts need no native library)."""

from __future__ import annotations

from typing import Any


def load_genai() -> Any:
    import onnxruntime_genai as og

    return og

"""Execution providers: the short names a profile and a device's inventory use, onnxruntime's names
for them, and their ranking (best first) for choosing between variants a device can run.

The one home of this knowledge: the builder's profiles, the agent's inventory and the fleet's variant
selection all read it from here.
"""

from __future__ import annotations

# short name -> onnxruntime's provider name, best first (the CPU last: every device has it).
EXECUTION_PROVIDERS: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "dml": "DmlExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
DEFAULT_PROVIDER = "cpu"

_RANK = {name: i for i, name in enumerate(EXECUTION_PROVIDERS)}


def ort_provider_name(short: str) -> str:
    """onnxruntime's name for a short provider name ("" means the CPU); "" for an unknown name."""
    return EXECUTION_PROVIDERS.get(short or DEFAULT_PROVIDER, "")


def provider_rank(short: str) -> int:
    """0 for the best provider; unknown names rank after every known one."""
    return _RANK.get(short or DEFAULT_PROVIDER, len(_RANK))

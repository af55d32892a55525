"""Hardware-aware selection of a release's package for each device, table-driven."""

from __future__ import annotations

from typing import Any

import pytest

from slmops_fleet.rollouts.variants import Variant, select_variant

GiB = 1 << 30
CPU_INT4 = Variant("c4" * 32, "model", "cpu-int4", "cpu", "int4", 1 * GiB)
CPU_FP32 = Variant("c3" * 32, "model", "cpu-fp32", "cpu", "fp32", 4 * GiB)
CUDA_FP16 = Variant("cf" * 32, "model", "cuda-fp16", "cuda", "fp16", 2 * GiB)
CPU_ONLY = {"providers": ["CPUExecutionProvider"], "memory_bytes": 8 * GiB}
WITH_CUDA = {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"], "memory_bytes": 8 * GiB}


@pytest.mark.parametrize(
    ("variants", "inventory", "chosen"),
    [
        ([CPU_INT4, CPU_FP32, CUDA_FP16], WITH_CUDA, CUDA_FP16),  # an accelerator first
        ([CPU_INT4, CPU_FP32, CUDA_FP16], CPU_ONLY, CPU_FP32),  # no CUDA: the higher precision that fits
        ([CPU_INT4, CPU_FP32, CUDA_FP16], {**CPU_ONLY, "memory_bytes": 2 * GiB}, CPU_INT4),  # fp32 does not fit
        ([CPU_INT4, CPU_FP32], {"memory_bytes": 8 * GiB}, CPU_FP32),  # no providers reported: CPU assumed
        ([CUDA_FP16], CPU_ONLY, None),
        ([CPU_INT4], {**CPU_ONLY, "memory_bytes": GiB // 2}, None),
        ([CPU_INT4], {"providers": ["CPUExecutionProvider"]}, None),  # memory unknown but needed
        ([Variant("u" * 64, "model", "cpu-any")], {}, Variant("u" * 64, "model", "cpu-any")),  # nothing needed
    ],
)
def test_select_variant(variants: list[Variant], inventory: dict[str, Any], chosen: Variant | None) -> None:
    sel = select_variant(variants, inventory=inventory)
    assert sel.package_id == (chosen.package_id if chosen else None)
    assert len(sel.candidates) == len(variants)
    verdicts = {c["package_id"]: c for c in sel.candidates}
    for v in variants:
        if chosen is not None and v is chosen:
            assert verdicts[v.package_id]["ok"] and verdicts[v.package_id]["why"].startswith("chosen")
        elif not verdicts[v.package_id]["ok"]:
            assert verdicts[v.package_id]["why"].startswith("needs"), verdicts[v.package_id]
    if chosen is None:
        assert sel.reason.startswith("no runnable variant: ")


def test_select_variant_says_why() -> None:
    sel = select_variant([CPU_INT4, CPU_FP32, CUDA_FP16], inventory={**CPU_ONLY, "memory_bytes": 3 * GiB})
    why = {c["profile"]: c["why"] for c in sel.candidates}
    assert sel.package_id == CPU_INT4.package_id
    assert why["cuda-fp16"] == "needs CUDAExecutionProvider; the device has CPUExecutionProvider"
    assert why["cpu-fp32"] == f"needs {4 * GiB} bytes of memory; the device has {3 * GiB}"
    assert sel.reason == (
        f"cpu-int4: CPUExecutionProvider, int4, needs {GiB} bytes of {3 * GiB} (2 of 3 variants not runnable here)"
    )
    assert [c["profile"] for c in sel.candidates] == ["cuda-fp16", "cpu-fp32", "cpu-int4"]  # the preference order


def test_select_variant_by_cpu_features() -> None:
    vnni = Variant("v4" * 32, "model", "cpu-int4-vnni", "cpu", "int8", GiB, cpu_features=("avx512_vnni", "avx512f"))
    inv = {**CPU_ONLY, "memory_bytes": 2 * GiB}
    plain = select_variant([vnni, CPU_INT4], inventory={**inv, "cpu_features": ["avx2", "avx512f"]})
    assert plain.package_id == CPU_INT4.package_id
    refused = next(c for c in plain.candidates if c["package_id"] == vnni.package_id)
    assert not refused["ok"] and refused["why"] == "needs CPU features avx512_vnni; the device does not report them"
    rich = select_variant([vnni, CPU_INT4], inventory={**inv, "cpu_features": ["AVX512_VNNI", "avx512f"]})
    assert rich.package_id == vnni.package_id  # int8 ranks above int4 once the device has the flags


def test_select_adapter_needs_the_base_the_device_runs() -> None:
    a1 = Variant("a1" * 32, "adapter", "", base_package_id="b1" * 32)
    a2 = Variant("a2" * 32, "adapter", "", base_package_id="b2" * 32)
    assert select_variant([a1, a2], inventory={}, active_base="b2" * 32).package_id == a2.package_id
    none = select_variant([a1], inventory={}, active_base="")
    assert none.package_id is None and "runs no model yet" in none.reason
    other = select_variant([a1], inventory={}, active_base="b3" * 32)
    assert other.package_id is None and f"the device runs {'b3' * 6}" in other.reason

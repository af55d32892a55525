"""Hardware profiles."""

from __future__ import annotations

import dataclasses

import pytest

from slmops_builder.profiles import PROFILES, Profile, UnknownProfileError, get_profile, profile_names


def test_known_profiles() -> None:
    assert profile_names() == ["cpu-int4", "cpu-int8", "cpu-fp32", "cuda-fp16", "cuda-int4"]
    p = get_profile("cpu-int4")
    assert (p.execution_provider, p.precision) == ("cpu", "int4")
    assert dict(p.quantization) == {"accuracy_level": "4", "block_size": "32"}
    assert p.builder_args() == ["-p", "int4", "-e", "cpu", "--extra_options", "accuracy_level=4", "block_size=32"]
    assert get_profile("cpu-fp32").builder_args() == ["-p", "fp32", "-e", "cpu"]
    assert get_profile("cuda-fp16").execution_provider == "cuda"
    # Smaller precisions need less memory.
    assert PROFILES["cpu-int4"].min_memory_bytes < PROFILES["cpu-int8"].min_memory_bytes
    assert PROFILES["cpu-int8"].min_memory_bytes < PROFILES["cpu-fp32"].min_memory_bytes


def test_unknown_profile_lists_known_names() -> None:
    with pytest.raises(UnknownProfileError) as err:
        get_profile("npu-magic")
    assert "npu-magic" in str(err.value) and "cpu-int4" in str(err.value) and "cuda-fp16" in str(err.value)


def test_profiles_are_frozen() -> None:
    p = get_profile("cpu-int4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.precision = "fp32"  # type: ignore[misc]
    with pytest.raises(TypeError):
        p.quantization["block_size"] = "64"  # type: ignore[index]
    assert hash(p.spec()["name"])  # spec is plain data (JSON-able for cache keys)


def test_to_pb() -> None:
    pb = get_profile("cpu-int4").to_pb()
    assert pb.name == "cpu-int4" and pb.execution_provider == "cpu" and pb.precision == "int4"
    assert dict(pb.quantization) == {"accuracy_level": "4", "block_size": "32"}
    assert pb.min_memory_bytes == get_profile("cpu-int4").min_memory_bytes
    assert get_profile("cpu-int4").to_pb(min_memory_bytes=5).min_memory_bytes == 5


def test_bad_profile_specs_refused() -> None:
    with pytest.raises(ValueError, match="precision"):
        Profile("x", "cpu", "int3")
    with pytest.raises(ValueError, match="provider"):
        Profile("x", "tpu", "int4")


def test_public_api_resolves() -> None:
    import slmops_builder

    for name in slmops_builder.__all__:
        assert getattr(slmops_builder, name) is not None, name
    with pytest.raises(AttributeError):
        _ = slmops_builder.not_a_thing  # type: ignore[attr-defined]

"""Hardware profiles."""

from __future__ import annotations

import dataclasses
from importlib.resources import files

import pytest

from slmops_builder.profiles import (
    PROFILES,
    Profile,
    ProfileSpecError,
    UnknownProfileError,
    get_profile,
    load_profiles,
    profile_names,
)


def test_known_profiles() -> None:
    assert profile_names() == [
        "cpu-int4",
        "cpu-int4-kquant",
        "cpu-int4-kquant-tied",
        "cpu-int4-gguf",
        "cpu-int4-gguf-mixed",
        "cpu-int4-gguf-exact",
        "cpu-int8",
        "cpu-fp32",
        "cuda-fp16",
        "cuda-int4",
        "dml-int4",
        "webgpu-int4",
        "cpu-int4-olive",
        "cpu-int4-gptq",
        "cpu-int4-gptq16",
    ]
    p = get_profile("cpu-int4")
    assert (p.execution_provider, p.precision, p.method, p.engine) == ("cpu", "int4", "rtn", "onnxruntime-genai")
    assert dict(p.quantization) == {"accuracy_level": "4", "block_size": "32"}
    assert p.builder_args() == ["-p", "int4", "-e", "cpu", "--extra_options", "accuracy_level=4", "block_size=32"]
    assert get_profile("cpu-fp32").builder_args() == ["-p", "fp32", "-e", "cpu"]
    assert get_profile("cpu-fp32").quantization_method == "" and get_profile("cpu-fp32").method == "none"
    assert get_profile("cuda-fp16").execution_provider == "cuda"
    assert get_profile("dml-int4").builder_args()[:4] == ["-p", "int4", "-e", "dml"]
    kquant = get_profile("cpu-int4-kquant")
    assert kquant.method == "k_quant" and kquant.quantization["algo_config"] == "k_quant_last"
    gguf = get_profile("cpu-int4-gguf")
    assert (gguf.method, gguf.engine, gguf.requires) == ("lossless-gguf", "slmops-gguf-lossless", "gguf-4bit")
    assert gguf.quantization_method == "lossless-gguf"
    assert get_profile("cpu-int4-gguf-exact").quantization["accuracy_level"] == "1"
    mixed = get_profile("cpu-int4-gguf-mixed")
    assert mixed.float_compute == ("down_proj",) and gguf.float_compute == ()
    assert "float_compute=down_proj" not in mixed.builder_args()  # the lossless engine's, not the model builder's
    assert mixed.spec() != gguf.spec()
    # Smaller precisions need less memory.
    assert PROFILES["cpu-int4"].min_memory_bytes < PROFILES["cpu-int8"].min_memory_bytes
    assert PROFILES["cpu-int8"].min_memory_bytes < PROFILES["cpu-fp32"].min_memory_bytes
    # Everything that changes the converted model is in the spec (the step cache key).
    assert get_profile("cpu-int4").spec() != get_profile("cpu-int4-kquant").spec()
    assert {"method", "engine", "quantization"} <= set(gguf.spec())


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
    with pytest.raises(TypeError):
        PROFILES["cpu-int4"] = p  # type: ignore[index]
    assert hash(p.spec()["name"])  # spec is plain data (JSON-able for cache keys)


def test_to_pb() -> None:
    pb = get_profile("cpu-int4").to_pb()
    assert pb.name == "cpu-int4" and pb.execution_provider == "cpu" and pb.precision == "int4"
    assert dict(pb.quantization) == {"accuracy_level": "4", "block_size": "32"}
    assert pb.min_memory_bytes == get_profile("cpu-int4").min_memory_bytes
    assert get_profile("cpu-int4").to_pb(min_memory_bytes=5).min_memory_bytes == 5
    assert list(pb.cpu_features) == []
    vnni = load_profiles(GOOD.replace('method = "rtn"', 'method = "rtn"\ncpu_features = ["avx512_vnni", "avx2"]'))
    assert list(vnni["p"].to_pb().cpu_features) == ["avx2", "avx512_vnni"]


def test_bad_profile_specs_refused() -> None:
    with pytest.raises(ValueError, match="precision"):
        Profile("x", "cpu", "int3")
    with pytest.raises(ValueError, match="provider"):
        Profile("x", "tpu", "int4")
    with pytest.raises(ProfileSpecError, match="method 'none' does not fit precision int4"):
        Profile("x", "cpu", "int4", method="none")
    with pytest.raises(ProfileSpecError, match="lossless-gguf goes with engine slmops-gguf-lossless"):
        Profile("x", "cpu", "int4", method="lossless-gguf")
    with pytest.raises(ProfileSpecError, match="cpu int4 method"):
        Profile("x", "cuda", "int4", method="lossless-gguf", engine="slmops-gguf-lossless", requires="gguf-4bit")
    with pytest.raises(ProfileSpecError, match="options must map strings to strings"):
        Profile("x", "cpu", "int4", {"block_size": 32})  # type: ignore[dict-item]
    assert Profile("x", "cpu", "fp16").method == "none" and Profile("x", "cpu", "int8").method == "rtn"
    lossless = {"method": "lossless-gguf", "engine": "slmops-gguf-lossless", "requires": "gguf-4bit"}
    level4 = {"accuracy_level": "4", "float_compute": "down_proj"}
    with pytest.raises(ProfileSpecError, match="float_compute is for engine slmops-gguf-lossless only"):
        Profile("x", "cpu", "int4", level4)
    with pytest.raises(ProfileSpecError, match="float_compute needs accuracy_level = '4'"):
        Profile("x", "cpu", "int4", {"accuracy_level": "1", "float_compute": "down_proj"}, **lossless)
    for bad in ("down", "down_proj,down_proj", "", "down_proj, o_proj"):
        with pytest.raises(ProfileSpecError, match="float_compute must name distinct projections"):
            Profile("x", "cpu", "int4", {**level4, "float_compute": bad}, **lossless)
    both = Profile("x", "cpu", "int4", {**level4, "float_compute": "down_proj,lm_head"}, **lossless)
    assert both.float_compute == ("down_proj", "lm_head")


GOOD = """
[profiles.p]
provider = "cpu"
precision = "int4"
method = "rtn"
engine = "onnxruntime-genai"
min_memory_mb = 256
options = { block_size = "32" }
"""


def test_profiles_file_is_validated() -> None:
    loaded = load_profiles(GOOD)
    assert loaded["p"].min_memory_bytes == 256 * 1024**2 and dict(loaded["p"].quantization) == {"block_size": "32"}
    cases = {
        GOOD.replace('method = "rtn"', 'method = "rtn"\nblocksize = 32'): r"profiles\.p: unknown key\(s\) blocksize",
        GOOD.replace('"int4"', '"int2"'): "precision 'int2'",
        GOOD.replace('"rtn"', '"awq"'): "method 'awq'",
        GOOD.replace('"onnxruntime-genai"', '"tvm"'): "engine 'tvm'",
        GOOD.replace("min_memory_mb = 256\n", ""): "missing key\\(s\\) min_memory_mb",
        GOOD.replace("256", "-1"): "min_memory_mb must be a positive integer",
        GOOD.replace('{ block_size = "32" }', "{ block_size = 32 }"): "strings to strings",
        GOOD + "\n[other]\nx = 1\n": "only a non-empty \\[profiles\\] table",
        "[profiles.p\n": "not valid TOML",
        GOOD.replace('method = "rtn"', 'method = "rtn"\ncpu_features = "avx2"'): "cpu_features must be a list",
        GOOD.replace('method = "rtn"', 'method = "rtn"\ncpu_features = ["AVX2"]'): "lower-case flag names",
    }
    for text, message in cases.items():
        with pytest.raises(ProfileSpecError, match=message):
            load_profiles(text, source="test.toml")
    # The shipped file is the one loaded at import.
    shipped = files("slmops_builder").joinpath("profiles.toml").read_text()
    assert load_profiles(shipped) == PROFILES


def test_public_api_resolves() -> None:
    import slmops_builder

    for name in slmops_builder.__all__:
        assert getattr(slmops_builder, name) is not None, name
    with pytest.raises(AttributeError):
        _ = slmops_builder.not_a_thing


def test_profiles_use_the_contract_s_providers_and_registered_engines() -> None:
    from slmops_builder.engines import CONVERSION_ENGINES
    from slmops_builder.profiles import PROVIDERS
    from slmops_protos.providers import EXECUTION_PROVIDERS

    assert set(PROVIDERS) <= set(EXECUTION_PROVIDERS)
    assert {p.engine for p in PROFILES.values()} == set(CONVERSION_ENGINES)

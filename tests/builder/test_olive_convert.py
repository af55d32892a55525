"""Olive as a conversion engine: profile validation, RTN and GPTQ conversions, and failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from slmops_builder.build import build_package
from slmops_builder.convert import convert, convert_key, stage
from slmops_builder.engines import ConversionError
from slmops_builder.engines.olive import OLIVE_EXTRAS, calibration_text, check_disjoint, olive_config
from slmops_builder.evaluate import heldout_text
from slmops_builder.profiles import Profile, ProfileSpecError, get_profile, load_profiles
from slmops_builder.steps import ENTRY_FILE

pytest.importorskip("olive", reason="the olive engine needs olive-ai")
og = pytest.importorskip("onnxruntime_genai")


def _generate(folder: Path, prompt: str = "hello world", new_tokens: int = 6) -> str:
    model = og.Model(str(folder))
    tok = og.Tokenizer(model)
    ids = tok.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    seq = gen.get_sequence(0)
    assert len(seq) > len(ids)
    return str(tok.decode(seq[len(ids) :]))


def _record(entry: Path) -> dict[str, object]:
    return dict(json.loads((entry / ENTRY_FILE).read_text()))


# --- (a) profile validation: fast, no Olive run --------------------------------------------------


def test_olive_profiles_load() -> None:
    rtn, gptq = get_profile("cpu-int4-olive"), get_profile("cpu-int4-gptq")
    assert (rtn.engine, rtn.method, rtn.quantization_method) == ("olive", "rtn", "rtn")
    assert (gptq.engine, gptq.method, gptq.quantization_method) == ("olive", "gptq", "gptq")
    assert dict(rtn.quantization) == {"block_size": "32", "accuracy_level": "4"}
    assert gptq.quantization["block_size"] == "32" and gptq.quantization["algo_config"] == "rtn_last"
    assert rtn.to_pb().precision == "int4"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "gptq"}, "method gptq goes with engine olive only"),
        ({"method": "gptq", "engine": "slmops-gguf-lossless"}, "lossless-gguf goes with engine"),
        ({"engine": "olive", "method": "k_quant"}, "engine olive quantizes with rtn or gptq, not 'k_quant'"),
        ({"engine": "olive", "method": "lossless-gguf"}, "lossless-gguf goes with engine slmops-gguf-lossless"),
        ({"engine": "olive", "provider": "cuda"}, "engine olive builds cpu int4 only"),
        ({"engine": "olive", "precision": "int8"}, "engine olive builds cpu int4 only"),
        ({"engine": "olive", "precision": "fp32", "method": "none"}, "engine olive quantizes with rtn or gptq"),
        ({"engine": "olive", "requires": "gguf-4bit"}, "engine olive builds cpu int4 only"),
        ({"engine": "olive", "options": {"gptq_sym": "true"}}, "option gptq_sym is for method gptq only"),
        ({"engine": "olive", "method": "gptq", "options": {"gptq_act": "1"}}, "unknown option gptq_act"),
        ({"engine": "olive", "method": "gptq", "options": {"gptq_sym": "yes"}}, "gptq_sym must be a bool"),
        ({"engine": "olive", "method": "gptq", "options": {"gptq_samples": "0"}}, "gptq_samples must be a int"),
        ({"engine": "olive", "method": "gptq", "options": {"block_size": "48"}}, r"group size \(block_size\) must be"),
    ],
)
def test_bad_olive_profiles_are_refused(kwargs: dict[str, object], message: str) -> None:
    args = {"provider": "cpu", "precision": "int4", "method": "rtn", "engine": "onnxruntime-genai", **kwargs}
    options = args.pop("options", {})
    with pytest.raises(ProfileSpecError, match=message):
        Profile(
            "x",
            str(args["provider"]),
            str(args["precision"]),
            options,  # type: ignore[arg-type]
            method=str(args["method"]),
            engine=str(args["engine"]),
            requires=str(args.get("requires", "any")),
        )


def test_olive_profile_in_toml_names_the_key() -> None:
    bad = '[profiles.x]\nprovider = "cpu"\nprecision = "int4"\nmethod = "gptq"\nengine = "onnxruntime-genai"\n'
    with pytest.raises(ProfileSpecError, match=r"profiles.toml: profile x: method gptq goes with engine olive only"):
        load_profiles(bad + "min_memory_mb = 1\n")
    good = bad.replace("onnxruntime-genai", "olive") + 'min_memory_mb = 1\noptions = { gptq_sym = "true" }\n'
    assert load_profiles(good)["x"].quantization["gptq_sym"] == "true"


def test_calibration_text_is_disjoint_from_heldout() -> None:
    text = calibration_text()
    assert len(text.split()) > 2000
    check_disjoint(text, heldout_text())
    with pytest.raises(ValueError, match="shares"):
        check_disjoint(text + "\n" + heldout_text()[:400], heldout_text())


def test_olive_workflow_and_cache_key(tiny_hf_model: Path, tmp_path: Path) -> None:
    rtn, gptq = get_profile("cpu-int4-olive"), get_profile("cpu-int4-gptq")
    cfg = olive_config(tiny_hf_model, rtn, tmp_path, None)
    assert list(cfg["passes"]) == ["builder"]
    # The model builder gets 0.18's option names (Olive's int4_* fields are ignored by 0.18).
    assert cfg["passes"]["builder"]["extra_options"] == {"accuracy_level": "4", "block_size": "32"}
    cfg = olive_config(tiny_hf_model, gptq, tmp_path, tmp_path / "calibration.txt")
    assert list(cfg["passes"]) == ["gptq", "builder"]
    assert cfg["passes"]["gptq"]["group_size"] == 32 and cfg["passes"]["gptq"]["data_config"] == "calibration"
    data = cfg["data_configs"][0]["load_dataset_config"]
    assert data["data_files"] == str(tmp_path / "calibration.txt") and "heldout" not in json.dumps(cfg)
    key_rtn, record = convert_key(tiny_hf_model, rtn)
    assert "olive-ai" in record["tools"] and record["params"]["olive_launcher"] >= 1
    assert key_rtn != convert_key(tiny_hf_model, get_profile("cpu-int4"))[0]
    _, record = convert_key(tiny_hf_model, gptq)
    assert len(record["params"]["calibration_sha256"]) == 64


# --- (b)-(d) real Olive runs -----------------------------------------------------------------------


def test_olive_rtn_conversion_loads_and_generates(
    tiny_hf_model: Path, signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    built = convert(tiny_hf_model, get_profile("cpu-int4-olive"), cache_dir=cache, threads=1, timeout_s=600)
    assert not built.cached
    record = _record(built.path)
    assert (record["engine"], record["quantization_method"]) == ("olive", "rtn")
    # The model-builder engine's layout: no Olive extras next to the model.
    names = {p.name for p in built.path.iterdir()}
    assert {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json"} <= names
    assert not names & OLIVE_EXTRAS
    reference = convert(tiny_hf_model, get_profile("cpu-int4"), cache_dir=cache, threads=1)
    assert names == {p.name for p in reference.path.iterdir()}
    # Olive's ModelBuilder pass is the model builder's RTN with the same options: the same weights.
    assert (built.path / "model.onnx.data").read_bytes() == (reference.path / "model.onnx.data").read_bytes()
    assert _generate(built.path) == _generate(reference.path)
    staged = stage(built.path, tmp_path / "stage", name="tiny-olive")
    assert _generate(staged)
    assert convert(tiny_hf_model, get_profile("cpu-int4-olive"), cache_dir=cache, threads=1).cached
    # A signed package of it (the cached conversion): the manifest's lineage names the engine.
    written = build_package(
        tiny_hf_model, "cpu-int4-olive", "tiny", "1.0.0", signing_key[0], tmp_path / "pkg", cache_dir=cache, threads=1
    )
    lineage = written.manifest.lineage
    assert (lineage.engine, lineage.quantization_method) == ("olive", "rtn")
    assert lineage.tool_versions["olive-ai"] and lineage.tool_versions["onnxruntime-genai"]
    assert written.manifest.profile.name == "cpu-int4-olive"


def test_olive_gptq_conversion_loads_and_generates(tiny_hf_model: Path, tmp_path: Path) -> None:
    built = convert(tiny_hf_model, get_profile("cpu-int4-gptq"), cache_dir=tmp_path / "cache", threads=1)
    record = _record(built.path)
    assert (record["engine"], record["quantization_method"]) == ("olive", "gptq")
    log = (built.path / "slmops_convert.log").read_text()
    assert "Running pass gptq" in log and "calibration.txt" in log and "heldout" not in log
    import onnx

    graph = onnx.load(str(built.path / "model.onnx"), load_external_data=False).graph
    attrs = {
        n.name: {a.name: a.i for a in n.attribute if a.name in ("bits", "block_size")}
        for n in graph.node
        if n.op_type == "MatMulNBits"
    }
    assert len(attrs) == 2 * 5 + 1  # qkv, o, gate, up, down per layer; lm_head
    # GPTQ's 4-bit groups of 32 in the layers; the lm_head is the model builder's RTN, 8-bit (rtn_last).
    assert all(a == {"bits": 4, "block_size": 32} for name, a in attrs.items() if "lm_head" not in name)
    assert [a["bits"] for name, a in attrs.items() if "lm_head" in name] == [8]
    assert _generate(built.path)


def test_failed_olive_run_names_the_problem(tiny_hf_model: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_hf_model, broken)
    cfg = json.loads((broken / "config.json").read_text())
    # a listed architecture (the check before the run passes it) of a model type transformers lacks
    cfg["model_type"] = "no_such_model"
    (broken / "config.json").write_text(json.dumps(cfg))
    cache = tmp_path / "cache"
    with pytest.raises(ConversionError, match=r"olive failed .*no_such_model") as info:
        convert(broken, get_profile("cpu-int4-olive"), cache_dir=cache, threads=1)
    assert "no_such_model" in info.value.log_tail
    entries = [p for p in (cache / "convert").iterdir() if not p.name.endswith(".lock")]
    assert entries == []  # a failed run leaves no cache entry

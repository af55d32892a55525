"""Conversion with onnxruntime-genai's model builder, the step cache, and staging."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from slmops_builder.convert import (
    convert,
    convert_key,
    inference_model_json,
    parse_search_overrides,
    stage,
    validate_search,
)
from slmops_builder.engines import ConversionError
from slmops_builder.profiles import get_profile
from slmops_builder.steps import ENTRY_FILE, StepCache, file_hashes

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_convert_is_cached_and_never_modified(tiny_hf_model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    profile = get_profile("cpu-int4")
    first = convert(tiny_hf_model, profile, cache_dir=cache, threads=1)
    assert not first.cached and first.seconds > 0
    assert (first.path / "genai_config.json").is_file() and (first.path / "model.onnx").is_file()
    record = json.loads((first.path / ENTRY_FILE).read_text())
    assert record["key"] == first.key and record["params"]["profile"]["name"] == "cpu-int4"
    # The engine and method that built it, for the manifest's lineage.
    assert (record["engine"], record["quantization_method"]) == ("onnxruntime-genai", "rtn")
    mtime = (first.path / "model.onnx").stat().st_mtime_ns
    hashes = file_hashes(first.path)

    second = convert(tiny_hf_model, profile, cache_dir=cache, threads=1)
    assert second.cached and second.path == first.path and second.key == first.key
    assert (second.path / "model.onnx").stat().st_mtime_ns == mtime  # not rewritten

    # Staging with overrides leaves the cache entry byte for byte as it was.
    staged = stage(second.path, tmp_path / "stage", name="tiny", search={"temperature": 0.3, "top_k": 5})
    assert file_hashes(first.path) == hashes
    genai = json.loads((staged / "genai_config.json").read_text())
    assert genai["search"]["temperature"] == 0.3 and genai["search"]["top_k"] == 5
    cached_genai = json.loads((first.path / "genai_config.json").read_text())
    assert cached_genai["search"]["temperature"] == 1.0
    assert not (staged / ENTRY_FILE).exists() and not (staged / "slmops_convert.log").exists()
    # Entry files are read-only, so an accidental write fails (for anyone but root).
    assert all(not p.stat().st_mode & 0o222 for p in first.path.iterdir())
    assert (staged / "model.onnx").stat().st_ino == (first.path / "model.onnx").stat().st_ino  # hard link
    assert (staged / "genai_config.json").stat().st_ino != (first.path / "genai_config.json").stat().st_ino
    assert [p.name for p in (cache / "convert").iterdir() if not p.name.endswith(".lock")] == [first.key]


def test_cache_key_follows_inputs_and_profile(tiny_hf_model: Path, tmp_path: Path) -> None:
    key_int4, _ = convert_key(tiny_hf_model, get_profile("cpu-int4"))
    key_fp32, _ = convert_key(tiny_hf_model, get_profile("cpu-fp32"))
    assert key_int4 != key_fp32
    assert convert_key(tiny_hf_model, get_profile("cpu-int4-kquant"))[0] != key_int4
    # The lossless profile's key holds the source GGUF's hash and the rewrite's format version.
    _, record = convert_key(tiny_hf_model, get_profile("cpu-int4-gguf"))
    assert {"gguf_sha256", "lossless_format"} <= set(record["params"]) and "gguf" in record["tools"]
    copy = tmp_path / "copy"
    shutil.copytree(tiny_hf_model, copy)
    (copy / "slmops_source.json").write_text("{}")  # lineage only: not an input of the conversion
    assert convert_key(copy, get_profile("cpu-int4"))[0] == key_int4
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(cfg))
    assert convert_key(copy, get_profile("cpu-int4"))[0] != key_int4


def test_failed_conversion_leaves_no_entry(tiny_hf_model: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_hf_model, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors at all")
    cache = tmp_path / "cache"
    with pytest.raises(ConversionError, match="model builder failed") as err:
        convert(broken, get_profile("cpu-int4"), cache_dir=cache, threads=1)
    assert err.value.log_tail  # the builder's own words come along
    assert [p for p in (cache / "convert").iterdir() if not p.name.endswith(".lock")] == []


def test_convert_refuses_a_non_model_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        convert(tmp_path, get_profile("cpu-int4"), cache_dir=tmp_path / "c")


def test_step_cache_reuses_and_cleans_up(tmp_path: Path) -> None:
    cache = StepCache(tmp_path)
    calls: list[Path] = []

    def produce(out: Path) -> None:
        calls.append(out)
        (out / "x").write_text("1")

    a = cache.run("s", "k1", produce)
    b = cache.run("s", "k1", produce)
    assert len(calls) == 1 and not a.cached and b.cached and (b.path / "x").read_text() == "1"

    def boom(out: Path) -> None:
        (out / "half").write_text("written")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.run("s", "k2", boom)
    assert not cache.entry("s", "k2").exists()
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["k1", "k1.lock", "k2.lock"]
    # An entry whose record is missing (a crash between writes) is rebuilt, not trusted.
    (tmp_path / "s" / "k1" / ENTRY_FILE).chmod(0o644)
    (tmp_path / "s" / "k1" / ENTRY_FILE).unlink()
    assert not cache.run("s", "k1", produce).cached and len(calls) == 2


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLMOPS_CACHE_DIR", str(tmp_path / "env-cache"))
    assert StepCache().root == tmp_path / "env-cache"
    assert StepCache(tmp_path / "arg").root == tmp_path / "arg"


def test_search_overrides() -> None:
    assert parse_search_overrides(["temperature=0.7", "top_k=40", "do_sample=true", "max_length=128"]) == {
        "temperature": 0.7,
        "top_k": 40,
        "do_sample": True,
        "max_length": 128,
    }
    assert validate_search({"temperature": 1}) == {"temperature": 1.0}
    with pytest.raises(ValueError, match="unknown search option"):
        parse_search_overrides(["nucleus=0.9"])
    with pytest.raises(ValueError, match="not key=value"):
        parse_search_overrides(["temperature"])
    with pytest.raises(ValueError, match="expects int"):
        parse_search_overrides(["top_k=many"])
    with pytest.raises(ValueError, match="true or false"):
        validate_search({"do_sample": "yes"})
    with pytest.raises(ValueError, match="integer"):
        validate_search({"top_k": 1.5})
    with pytest.raises(ValueError, match="positive"):
        validate_search({"max_length": 0})


def test_inference_model_json_from_templates() -> None:
    chatml = inference_model_json("m", SMOLLM2_TEMPLATE)
    assert chatml["Name"] == "m"
    tmpl = chatml["PromptTemplate"]
    # The default system prompt SmolLM2's template injects is not part of the user's template.
    assert tmpl["user"] == "<|im_start|>user\n{Content}<|im_end|>\n"
    assert tmpl["prompt"] == "<|im_start|>user\n{Content}<|im_end|>\n<|im_start|>assistant\n"
    assert tmpl["system"] == "<|im_start|>system\n{Content}<|im_end|>\n"
    assert tmpl["assistant"] == "<|im_start|>assistant\n{Content}<|im_end|>\n"
    phi = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    )
    assert inference_model_json("p", phi)["PromptTemplate"]["prompt"] == "<|user|>\n{Content}<|end|>\n<|assistant|>\n"
    # A template that cannot be rendered this way falls back to ChatML rather than failing the build.
    assert inference_model_json("x", "{{ raise_exception('no') }}")["PromptTemplate"]["user"].startswith("<|im_start|>")
    assert inference_model_json("x", None)["PromptTemplate"] == tmpl


def test_stage_refuses_existing_folder_and_bad_search(
    tiny_hf_model: Path, builder_cache_dir: Path, tmp_path: Path
) -> None:
    entry = convert(tiny_hf_model, get_profile("cpu-int4"), cache_dir=builder_cache_dir, threads=1)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        stage(entry.path, tmp_path / "exists", name="x")
    with pytest.raises(ValueError, match="unknown search option"):
        stage(entry.path, tmp_path / "new", name="x", search={"bogus": 1})
    assert not (tmp_path / "new").exists()
    staged = stage(entry.path, tmp_path / "ok", name="x")
    tok_cfg = json.loads((staged / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]  # Foundry Local and older runtimes read it here
    assert json.loads((staged / "inference_model.json").read_text())["Name"] == "x"


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(tmp_path: Path) -> None:
    """A process SIGKILLed while producing leaves `<key>.tmp-<pid>`; the next run of the key (holding
    its lock) removes it and builds the entry afresh."""
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys, time; from pathlib import Path; from slmops_builder.steps import StepCache\n"
        "def produce(out):\n"
        "    (out / 'half').write_text('x'); print('producing', flush=True); time.sleep(60)\n"
        "StepCache(Path(sys.argv[1])).run('s', 'k', produce)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "producing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert [p.name for p in (tmp_path / "s").glob("k.tmp-*")] == [f"k.tmp-{proc.pid}"]
    t0 = time.monotonic()
    result = StepCache(tmp_path).run("s", "k", lambda out: (out / "x").write_text("1"))
    assert not result.cached and (result.path / "x").read_text() == "1" and time.monotonic() - t0 < 10
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["k", "k.lock"]


def test_kquant_tied_keeps_one_int4_table_for_a_tied_model(tiny_hf_model: Path, tmp_path: Path) -> None:
    import onnx
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tied = tmp_path / "tied"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_hf_model), dtype=torch.float32)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    model.save_pretrained(str(tied))
    AutoTokenizer.from_pretrained(str(tiny_hf_model)).save_pretrained(str(tied))
    built = convert(tied, get_profile("cpu-int4-kquant-tied"), cache_dir=tmp_path / "cache", threads=1)
    graph = onnx.load(str(built.path / "model.onnx"), load_external_data=False).graph
    assert "GatherBlockQuantized" in {n.op_type for n in graph.node}  # the embedding reads the lm_head's table
    (head,) = [n for n in graph.node if n.name.startswith("/lm_head/")]
    assert head.op_type == "MatMulNBits" and {a.name: a.i for a in head.attribute}["bits"] == 4

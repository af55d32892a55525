"""`slmops builder ...` through typer's runner and, once, through the installed console command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from slmops_builder.cli import app

runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_keygen_build_inspect_verify(tiny_hf_model: Path, builder_cache_dir: Path, tmp_path: Path) -> None:
    key = tmp_path / "keys" / "signing.key"
    out = _ok(["keygen", "--out", str(key)])
    assert "key id" in out and key.is_file() and Path(str(key) + ".pub").is_file()
    again = runner.invoke(app, ["keygen", "--out", str(key)])
    assert again.exit_code == 1 and "refusing to overwrite" in again.output
    _ok(["keygen", "--out", str(key), "--force"])

    pkg = tmp_path / "pkg"
    args = ["build", "--model", str(tiny_hf_model), "--profile", "cpu-int4", "--name", "tiny", "--version", "1.2.3"]
    args += ["--key", str(key), "--out", str(pkg), "--cache-dir", str(builder_cache_dir), "--threads", "1"]
    summary = json.loads(_ok([*args, "--search", "temperature=0.6", "-s", "top_k=7", "--json"]))
    assert summary["name"] == "tiny" and summary["version"] == "1.2.3" and summary["profile"] == "cpu-int4"
    assert summary["files"] == 7 and summary["size_bytes"] > 50_000
    assert set(summary["steps"]) == {"convert", "stage", "evaluate", "package"}

    inspected = json.loads(_ok(["inspect", str(pkg), "--json"]))
    assert inspected["package_id"] == summary["package_id"]
    genai_sha = next(f["sha256"] for f in inspected["manifest"]["files"] if f["path"] == "genai_config.json")
    search = json.loads((pkg / "blobs" / genai_sha).read_text())["search"]
    assert search["temperature"] == 0.6 and search["top_k"] == 7

    table = _ok(["inspect", str(pkg)])
    assert "cpu-int4" in table and "genai_config.json" in table and "unverified" in table

    verified = json.loads(_ok(["verify", str(pkg), "--key", str(key) + ".pub", "--json"]))
    assert verified["ok"] and verified["package_id"] == summary["package_id"] and verified["files"] == 7

    # Tamper with a blob: verify says so and exits 3.
    blob = pkg / "blobs" / genai_sha
    blob.write_text(blob.read_text().replace("0.6", "0.9"))
    bad = runner.invoke(app, ["verify", str(pkg), "--key", str(key) + ".pub"])
    assert bad.exit_code == 3 and "does not match its SHA-256" in bad.output

    # Another key does not verify it.
    other = tmp_path / "other.key"
    _ok(["keygen", "--out", str(other)])
    bad = runner.invoke(app, ["verify", str(pkg), "--key", str(other) + ".pub"])
    assert bad.exit_code == 3 and "untrusted" in bad.output

    # The human display of a build: progress on stderr and a file table with the package id.
    pkg2 = tmp_path / "pkg2"
    args[args.index(str(pkg))] = str(pkg2)
    human = _ok(args)
    assert "package id" in human and "model.onnx" in human


def test_user_errors_are_one_line_and_non_zero(tiny_hf_model: Path, tmp_path: Path) -> None:
    key = tmp_path / "k"
    _ok(["keygen", "--out", str(key)])
    base = ["build", "--model", str(tiny_hf_model), "--name", "t", "--version", "1.0.0", "--out", str(tmp_path / "p")]
    cases = {
        "signing key not found": [*base, "--key", str(tmp_path / "missing")],
        "unknown hardware profile 'tpu'": [*base, "--key", str(key), "--profile", "tpu"],
        "unknown search option": [*base, "--key", str(key), "--search", "warmth=1"],
        "not a semantic version": [*base[:5], "--version", "1.0", "--out", str(tmp_path / "p"), "--key", str(key)],
    }
    for expected, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (expected, result.output)
        assert expected in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output
    missing = ["build", "--model", str(tmp_path / "nomodel"), "--name", "t", "--version", "1.0.0"]
    result = runner.invoke(app, [*missing, "--key", str(key), "--out", str(tmp_path / "p")])
    assert result.exit_code == 1 and "no model folder" in result.output
    result = runner.invoke(app, ["import", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "not found" in result.output
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 3 and "not a package folder" in result.output
    result = runner.invoke(app, ["verify", str(tmp_path), "--key", str(key)])  # a private key given as public
    assert result.exit_code == 1 and "not a hex Ed25519 public key" in result.output
    assert not (tmp_path / "p").exists()
    data = tmp_path / "task.jsonl"
    data.write_text('{"input": "a", "output": "b"}\n')
    distill = ["distill", "-t", str(tiny_hf_model), "-d", str(data), "-o", str(tmp_path / "d"), "--scorer", "regex"]
    result = runner.invoke(app, distill)  # a settings error of the whole model reads as one plain sentence
    assert result.exit_code == 1 and "bad settings: the regex scorer and validity rule need a pattern" in result.output
    assert "Value error" not in result.output and "()" not in result.output and not (tmp_path / "d").exists()


def test_import_hf_folder_json(tiny_hf_model: Path, tmp_path: Path) -> None:
    data = json.loads(_ok(["import", str(tiny_hf_model), "--out", str(tmp_path / "m"), "--json"]))
    assert data["architecture"] == "LlamaForCausalLM" and (tmp_path / "m" / "slmops_source.json").is_file()


def test_profiles_listing() -> None:
    data = json.loads(_ok(["profiles", "--json"]))
    assert {"cpu-int4", "cpu-int8", "cpu-fp32"} <= {p["name"] for p in data}
    int4 = next(p for p in data if p["name"] == "cpu-int4")
    assert (int4["method"], int4["engine"]) == ("rtn", "onnxruntime-genai")
    assert int4["quantization"]["block_size"] == "32"
    assert "Gemma3ForCausalLM" in int4["architectures"]
    assert next(p for p in data if p["name"] == "cpu-int4-gguf")["architectures"] == ["LlamaForCausalLM"]
    assert "cpu-int4" in _ok(["profiles"])


def test_console_command_and_cheap_import(tmp_path: Path) -> None:
    heavy = "('torch', 'transformers', 'onnxruntime_genai')"
    code = f"import sys, slmops_builder.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    slmops = Path(sys.executable).with_name("slmops")
    result = subprocess.run(
        [str(slmops), "builder", "keygen", "--out", str(tmp_path / "k")], capture_output=True, text=True
    )
    assert result.returncode == 0 and (tmp_path / "k.pub").is_file(), result.stderr
    result = subprocess.run(
        [str(slmops), "builder", "verify", str(tmp_path), "--key", str(tmp_path / "k.pub")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 3 and "Traceback" not in result.stderr and "not a package folder" in result.stderr

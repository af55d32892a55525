"""Recipes: one TOML file -> a signed, evaluated, gated package per profile; the step cache; reports;
and the bad inputs that must fail with the file or key named and nothing written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmops_builder.cli import app
from slmops_builder.importer import ModelImportError
from slmops_builder.keys import load_public_key
from slmops_builder.packaging import verify_package
from slmops_builder.recipe_plan import plan_recipe
from slmops_builder.recipe_run import build_recipe
from slmops_builder.recipe_schema import RecipeError, load_recipe

runner = CliRunner()


def _write(folder: Path, body: str, name: str = "recipe.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(body)
    return path


def _recipe(model: Path, profiles: str, extra: str = "") -> str:
    return (
        f'name = "tiny"\nversion = "1.0.0"\nmodel = "{model}"\nprofiles = {profiles}\noutput = "dist"\n'
        f"{extra}\n[evaluation]\ngolden_max_new_tokens = 6\nmax_tokens = 256\nthreads = 1\n"
    )


def test_two_profiles_two_signed_packages_then_cache_hits(
    tiny_hf_model: Path, signing_key: tuple[Path, Path], builder_cache_dir: Path, tmp_path: Path
) -> None:
    body = _recipe(tiny_hf_model, '["cpu-int4", "cpu-fp32"]', "security_version = 2")
    body += "\n[gates]\nmax_ppl_ratio = 1.5\nmax_size_mb = 64\n"
    path = _write(tmp_path, body)
    loaded = load_recipe(path)
    result = build_recipe(loaded, signing_key[0], cache_dir=builder_cache_dir)
    assert result.ok and result.reference == "cpu-fp32"
    assert [(v.profile, v.verdict) for v in result.variants] == [("cpu-int4", "packaged"), ("cpu-fp32", "packaged")]
    public = [load_public_key(signing_key[1])]
    out = tmp_path / "dist"
    for profile, method in (("cpu-int4", "rtn"), ("cpu-fp32", "")):
        m = verify_package(out / profile, public).manifest
        assert m.profile.name == profile and m.name == "tiny" and m.version == "1.0.0"
        assert m.security_version == 2
        assert m.lineage.recipe_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert m.lineage.engine == "onnxruntime-genai" and m.lineage.quantization_method == method
        assert m.lineage.base_model_sha256 and "onnxruntime-genai" in m.lineage.tool_versions
        metrics = m.evaluation.metrics
        assert {"perplexity", "ppl_ratio", "decode_tps", "ttft_ms", "peak_rss_mb", "size_ratio"} <= set(metrics)
        assert "inference_model.json" in {f.path for f in m.files}
        assert m.golden_prompts[0].reference.strip()
    fp32 = verify_package(out / "cpu-fp32", public).manifest.evaluation
    int4 = verify_package(out / "cpu-int4", public).manifest.evaluation
    assert fp32.metrics["ppl_ratio"] == 1.0 and int4.size_bytes < fp32.size_bytes
    assert int4.metrics["size_ratio"] == pytest.approx(int4.size_bytes / fp32.size_bytes)
    report = json.loads((out / "report.json").read_text())
    assert (
        report["ok"]
        and report["reference"] == "cpu-fp32"
        and report["gates"] == {"max_ppl_ratio": 1.5, "max_size_mb": 64}
    )
    gate = report["variants"][0]["gates"][0]
    assert gate["gate"] == "max_ppl_ratio" and gate["passed"] and gate["measured"] == int4.metrics["ppl_ratio"]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The plan now finds every step in the cache; the second build reuses them all.
    plan = plan_recipe(loaded, cache_dir=builder_cache_dir)
    assert all(p.cached for p in plan if p.step in ("import", "convert", "evaluate"))
    shown = runner.invoke(app, ["build", str(path), "--dry-run", "--cache-dir", str(builder_cache_dir)])
    assert shown.exit_code == 0 and "hit" in shown.output and "miss" not in shown.output
    args = ["build", str(path), "--key", str(signing_key[0]), "--cache-dir", str(builder_cache_dir), "--json"]
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    second = json.loads(again.output)
    cached = {(s["step"], s["target"]): s["cached"] for s in second["steps"]}
    assert cached[("import", str(tiny_hf_model.resolve()))]
    assert all(cached[(step, p)] for step in ("convert", "evaluate") for p in ("cpu-int4", "cpu-fp32"))
    assert second["variants"][0]["metrics"] == report["variants"][0]["metrics"]  # evaluation reused
    for profile in ("cpu-int4", "cpu-fp32"):
        verify_package(out / profile, public)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist", "recipe.toml"]  # no partial folders


def test_failing_gate_blocks_packaging_and_fallback_picks_the_next(
    tiny_hf_model: Path, signing_key: tuple[Path, Path], builder_cache_dir: Path, tmp_path: Path
) -> None:
    # fp32 first in the chain, but a size gate only int4 meets: fp32 fails, int4 is packaged.
    body = _recipe(tiny_hf_model, '["cpu-fp32", "cpu-int4"]', 'fallback = ["cpu-fp32", "cpu-int4"]')
    path = _write(tmp_path / "a", body + "\n[gates]\nmax_size_ratio = 0.6\n")
    result = build_recipe(load_recipe(path), signing_key[0], cache_dir=builder_cache_dir)
    verdicts = {v.profile: (v.verdict, v.reason) for v in result.variants}
    assert verdicts["cpu-fp32"][0] == "failed gates"
    assert verdicts["cpu-fp32"][1] == "max_size_ratio: size_ratio 1x > 0.6x"
    assert verdicts["cpu-int4"][0] == "packaged" and result.ok
    out = tmp_path / "a" / "dist"
    assert sorted(p.name for p in out.iterdir()) == ["cpu-int4", "report.json", "report.png"]

    # Every variant fails: nothing is packaged, the report says why, the CLI exits 4.
    path = _write(tmp_path / "b", _recipe(tiny_hf_model, '["cpu-int4"]') + "\n[gates]\nmin_decode_tps = 1e9\n")
    args = ["build", str(path), "--key", str(signing_key[0]), "--cache-dir", str(builder_cache_dir)]
    result_cli = runner.invoke(app, args)
    assert result_cli.exit_code == 4, result_cli.output
    assert "min_decode_tps: decode_tps" in result_cli.output and "< 1e+09 tok/s" in result_cli.output
    out = tmp_path / "b" / "dist"
    report = json.loads((out / "report.json").read_text())
    assert not report["ok"] and report["variants"][0]["verdict"] == "failed gates"
    assert report["variants"][0]["gates"][0]["threshold"] == 1e9 and not report["variants"][0]["package_id"]
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.png"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('name = "t"\nversion = "1.0.0"\nprofiles = ["cpu-int4"]\ncolour = "red"\n', "unknown key 'colour'"),
        (
            'name = "t"\nversion = "1.0.0"\nprofiles = ["cpu-int4"]\n[gates]\nmax_ppl = 1.1\n',
            "unknown key 'gates.max_ppl' (known: max_peak_rss_mb, max_perplexity, max_ppl_ratio",
        ),
        ('name = "t"\nversion = "1.0.0"\nprofiles = ["tpu-int4"]\n', "profiles: unknown hardware profile 'tpu-int4'"),
        (
            'name = "t"\nversion = "1.0.0"\nprofiles = ["cpu-int4"]\n[gates]\nmax_ppl_ratio = 1.05\n',
            "gates.max_ppl_ratio needs a reference variant",
        ),
        (
            'name = "t"\nversion = "1.0.0"\nprofiles = ["cpu-int4"]\n[gates]\nmin_task_accuracy = 0.9\n',
            "gates.min_task_accuracy needs a task set",
        ),
        ('name = "t"\nversion = "1.0"\nprofiles = ["cpu-int4"]\n', "not a semantic version"),
        ('name = "t"\nversion = "1.0.0"\n', "no profiles"),
        ('name = "t"\nversion = "1.0.0"\nprofiles = ["cpu-int4"]\nsecurity_version = -1\n', "security_version"),
        ('name = "t"\nversion = "1.0.0"\nprofiles = ["cpu-int4"\n', "not valid TOML"),
        ('name = "t"\nversion = "1.0.0"\nprofiles = ["cpu-int4"]\nmodel = "none.gguf"\n', "model: "),
        ('name = "t"\nversion = "1.0.0"\nprofiles = ["cpu-int4"]\n[search]\nwarmth = 1\n', "unknown search option"),
        (
            'name = "t"\nversion = "1.0.0"\nprofiles = ["cpu-int4"]\n[evaluation]\ntasks = "t.jsonl"\n',
            "evaluation.tasks: task set not found",
        ),
        (
            'name = "t"\nversion = "1.0.0"\nprofiles = ["cpu-int4"]\n[evaluation]\nheldout = "none.txt"\n',
            "evaluation.heldout: ",
        ),
    ],
)
def test_bad_recipes_fail_before_any_work(
    body: str, expected: str, signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert expected in str(info.value) and str(path) in str(info.value)
    cache = tmp_path / "cache"
    result = runner.invoke(app, ["build", str(path), "--key", str(signing_key[0]), "--cache-dir", str(cache)])
    assert result.exit_code == 1 and expected in " ".join(result.output.split()) and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.toml"]  # no cache, no output


def test_reference_that_cannot_run_here_is_refused(signing_key: tuple[Path, Path], tmp_path: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():  # pragma: no cover - GPU machines
        pytest.skip("this machine runs CUDA")
    body = 'name = "t"\nversion = "1.0.0"\nprofiles = ["cpu-int4"]\n'
    body += '[gates]\nreference = "cuda-fp16"\nmax_ppl_ratio = 1.1\n'
    loaded = load_recipe(_write(tmp_path, body))
    with pytest.raises(RecipeError, match=r"gates\.reference: cuda-fp16 cannot be evaluated on this machine"):
        build_recipe(loaded, signing_key[0], cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "dist").exists()


def _bad_model(tiny_hf_model: Path, tmp_path: Path, kind: str) -> Path:
    model = tmp_path / kind
    shutil.copytree(tiny_hf_model, model)
    if kind == "corrupt":
        (model / "model.safetensors").write_bytes(b"\x00" * 64)
    elif kind == "noweights":
        (model / "model.safetensors").unlink()
    else:
        config = json.loads((model / "config.json").read_text())
        config["architectures"] = ["BertForMaskedLM"]
        (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("corrupt", "model.safetensors is corrupt or truncated"),
        ("noweights", "has no weights"),
        ("unsupported", "architecture ['BertForMaskedLM'] is not supported"),
    ],
)
def test_bad_models_fail_naming_the_file_and_leave_nothing(
    kind: str, expected: str, tiny_hf_model: Path, signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    model = _bad_model(tiny_hf_model, tmp_path, kind)
    path = _write(tmp_path / "r", _recipe(model, '["cpu-int4"]'))
    with pytest.raises(ModelImportError, match=str(model).replace("[", r"\[")):
        build_recipe(load_recipe(path), signing_key[0], cache_dir=tmp_path / "cache")
    result = runner.invoke(
        app, ["build", str(path), "--key", str(signing_key[0]), "--cache-dir", str(tmp_path / "cache")]
    )
    assert result.exit_code == 1 and expected in " ".join(result.output.split()), result.output
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["recipe.toml"]  # no output, no partial
    assert not [p for p in (tmp_path / "cache" / "import").iterdir() if not p.name.endswith(".lock")]


def test_gguf_only_profile_needs_a_gguf_source(tiny_hf_model: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="profiles: cpu-int4-gguf need a GGUF model source"):
        load_recipe(_write(tmp_path, _recipe(tiny_hf_model, '["cpu-int4-gguf"]')))


def test_output_that_is_not_a_build_output_is_kept(
    tiny_hf_model: Path, signing_key: tuple[Path, Path], tmp_path: Path
) -> None:
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / "precious.txt").write_text("keep me")
    loaded = load_recipe(_write(tmp_path, _recipe(tiny_hf_model, '["cpu-int4"]')))
    with pytest.raises(RecipeError, match="is not a recipe build's output"):
        build_recipe(loaded, signing_key[0], cache_dir=tmp_path / "cache")
    assert (tmp_path / "dist" / "precious.txt").read_text() == "keep me" and not (tmp_path / "cache").exists()


def test_recipe_and_single_build_options_do_not_mix(tiny_hf_model: Path, tmp_path: Path) -> None:
    path = _write(tmp_path, _recipe(tiny_hf_model, '["cpu-int4"]'))
    result = runner.invoke(app, ["build", str(path), "--model", str(tiny_hf_model)])
    assert result.exit_code == 1 and "--model cannot be combined with a recipe" in result.output
    result = runner.invoke(app, ["build", str(tmp_path / "recipe.yaml"), "--key", "k"])
    assert result.exit_code == 1 and "is not a recipe (.toml)" in result.output
    result = runner.invoke(app, ["build", str(path)])
    assert result.exit_code == 1 and "missing --key" in result.output
    result = runner.invoke(app, ["build", "--name", "x"])
    assert result.exit_code == 1 and "missing --model, --version, --key, --out" in result.output


def test_bundled_example_recipe_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "builder" / "recipes" / "smollm2.toml"
    loaded = load_recipe(example)
    assert loaded.source == "smollm2" and loaded.recipe.reference == "cpu-fp32"
    assert loaded.recipe.fallback == ["cpu-int4", "cpu-int8", "cpu-fp32"]


def test_variant_this_machine_cannot_run_fails_its_gates_with_the_reason(
    tiny_hf_model: Path, signing_key: tuple[Path, Path], builder_cache_dir: Path, tmp_path: Path
) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():  # pragma: no cover - GPU machines
        pytest.skip("this machine runs CUDA")
    body = _recipe(tiny_hf_model, '["cpu-int4", "cuda-fp16"]') + "\n[gates]\nmin_decode_tps = 1\nmax_size_mb = 64\n"
    result = build_recipe(load_recipe(_write(tmp_path, body)), signing_key[0], cache_dir=builder_cache_dir)
    cuda = next(v for v in result.variants if v.profile == "cuda-fp16")
    assert cuda.verdict == "failed gates" and not result.ok
    assert cuda.reason == "min_decode_tps: decode_tps not measured: this machine cannot run the variant"
    assert [g.passed for g in cuda.gates] == [False, True]  # the size is measured all the same
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == ["cpu-int4", "report.json", "report.png"]


@pytest.mark.parametrize(
    ("tasks", "schema", "expected"),
    [
        ('{"input": "a", "output": "{\\"x\\": 1}"}\n', None, "evaluation.task_schema: "),  # no schema file
        ('{"input": "a", "output": "{\\"x\\": 1}"}\n', "[1]", "a JSON Schema is an object; got list"),
        ('{"input": "a", "output": "{\\"x\\": 1}"}\n', "{oops", "is not a JSON file"),
        ('{"input": "a", "output": "plain words"}\n', '{"type": "object"}', "task 1's output is not JSON"),
    ],
)
def test_a_task_schema_is_checked_with_the_recipe(
    tmp_path: Path, tasks: str, schema: str | None, expected: str
) -> None:
    (tmp_path / "t.jsonl").write_text(tasks)
    if schema is not None:
        (tmp_path / "s.json").write_text(schema)
    body = 'name = "t"\nversion = "1.0.0"\nprofiles = ["cpu-int4"]\n[evaluation]\ntasks = "t.jsonl"\n'
    body += 'task_schema = "s.json"\n'
    with pytest.raises(RecipeError, match=r"evaluation\.task_schema") as info:
        load_recipe(_write(tmp_path, body))
    assert expected in str(info.value)
    (tmp_path / "s.json").write_text('{"type": "object"}')
    (tmp_path / "t.jsonl").write_text('{"input": "a", "output": "{\\"x\\": 1}"}\n')
    assert load_recipe(tmp_path / "recipe.toml").task_schema == '{"type": "object"}'


def test_a_task_system_prompt_needs_a_task_set(tmp_path: Path) -> None:
    body = 'name = "t"\nversion = "1.0.0"\nprofiles = ["cpu-int4"]\n[evaluation]\ntask_system = "Be brief."\n'
    with pytest.raises(RecipeError, match=r"evaluation\.task_system needs a task set"):
        load_recipe(_write(tmp_path, body))
    with pytest.raises(RecipeError, match=r"task_system"):
        load_recipe(_write(tmp_path, body.replace('"Be brief."', '""')))
    (tmp_path / "t.jsonl").write_text('{"input": "a", "output": "b"}\n')
    loaded = load_recipe(_write(tmp_path, body + 'tasks = "t.jsonl"\n'))
    assert loaded.recipe.evaluation.task_system == "Be brief."


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ('task_scorer = "bleu"', "evaluation.task_scorer: must be one of json, exact, contains, regex, f1, rouge_l"),
        ('task_scorer = "regex"', 'task_scorer = "regex" needs task_pattern'),
        ('task_scorer = "regex"\ntask_pattern = "(unclosed"', "task_pattern: pattern '(unclosed' is not a regular"),
        ('task_pattern = "[a-z]+"', 'task_pattern is the pattern of task_scorer = "regex"'),
        ('task_scorer = "f1"\ntasks = "none.jsonl"', "evaluation.tasks: task set not found"),
    ],
)
def test_a_task_scorer_is_checked_with_the_recipe(tmp_path: Path, keys: str, expected: str) -> None:
    (tmp_path / "t.jsonl").write_text('{"input": "a", "output": "b"}\n')
    body = f'name = "t"\nversion = "1.0.0"\nprofiles = ["cpu-int4"]\n[evaluation]\n{keys}\n'
    if "tasks =" not in keys:
        body += 'tasks = "t.jsonl"\n'
    with pytest.raises(RecipeError) as info:
        load_recipe(_write(tmp_path, body))
    assert expected in str(info.value) and str(tmp_path / "recipe.toml") in str(info.value)
    body = 'name = "t"\nversion = "1.0.0"\nprofiles = ["cpu-int4"]\n[evaluation]\ntask_scorer = "f1"\n'
    with pytest.raises(RecipeError, match=r"evaluation\.task_scorer needs a task set"):
        load_recipe(_write(tmp_path, body))
    loaded = load_recipe(_write(tmp_path, body + 'tasks = "t.jsonl"\n'))
    assert loaded.recipe.evaluation.task_spec().scorer == "f1"
    regex = body.replace('"f1"', '"regex"\ntask_pattern = "[A-Z][a-z]+"') + 'tasks = "t.jsonl"\n'
    spec = load_recipe(_write(tmp_path, regex)).recipe.evaluation.task_spec()
    assert (spec.scorer, spec.pattern) == ("regex", "[A-Z][a-z]+")
    plain = load_recipe(_write(tmp_path, body.replace('task_scorer = "f1"\n', 'tasks = "t.jsonl"\n')))
    assert plain.recipe.evaluation.task_spec().scorer == "exact"  # the default: exact match


def test_a_free_text_task_is_scored_by_the_recipes_scorer(
    tiny_hf_model: Path, signing_key: tuple[Path, Path], builder_cache_dir: Path, tmp_path: Path
) -> None:
    from slmops_builder.convert import convert
    from slmops_builder.evaluate import GoldenPromptSpec, evaluate_folder
    from slmops_builder.profiles import get_profile

    # The reference is the start of the tiny model's greedy answer (its first 4 tokens); given the
    # reference's length + 8 tokens, the model says more: "contains" scores 1, exact match 0.
    prompt = "Name a colour"
    fp32 = convert(tiny_hf_model, get_profile("cpu-fp32"), cache_dir=builder_cache_dir, threads=1).path
    start = evaluate_folder(fp32, [GoldenPromptSpec(prompt, 4)], threads=1).references[0].strip()
    assert start, "the tiny model answered nothing"
    (tmp_path / "t.jsonl").write_text(json.dumps({"input": prompt, "output": start}) + "\n")
    base = _recipe(tiny_hf_model, '["cpu-fp32"]') + 'tasks = "t.jsonl"\n'
    results = {}
    for scorer in ("contains", None):
        body = base + (f'task_scorer = "{scorer}"\n' if scorer else "")
        out = tmp_path / str(scorer)
        path = _write(out, body)
        shutil.copy(tmp_path / "t.jsonl", out / "t.jsonl")
        result = build_recipe(load_recipe(path), signing_key[0], cache_dir=builder_cache_dir)
        assert result.ok and not result.cached["evaluate:cpu-fp32"]  # the scorer is in the evaluate key
        report = json.loads((out / "dist" / "report.json").read_text())
        assert report["task"] == {"examples": 1, "scorer": scorer or "exact", "pattern": None}
        manifest = verify_package(out / "dist" / "cpu-fp32", [load_public_key(signing_key[1])]).manifest
        results[scorer] = manifest.evaluation.metrics["task_accuracy"]
        assert report["variants"][0]["metrics"]["task_accuracy"] == results[scorer]
    assert results == {"contains": 1.0, None: 0.0}

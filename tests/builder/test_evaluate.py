"""Evaluation through onnxruntime-genai: perplexity against transformers, task accuracy, speed and
memory in a fresh process; the gates that read those metrics."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from slmops_builder.convert import convert
from slmops_builder.evaluate import (
    PREFILL_CHUNK,
    GoldenPromptSpec,
    TaskExample,
    evaluate_folder,
    evaluate_variant,
    heldout_text,
    load_tasks,
    perplexity,
)
from slmops_builder.gates import Gates, check_gates
from slmops_builder.profiles import get_profile


@pytest.fixture(scope="module")
def trained_tiny(tiny_hf_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model trained for a few seconds on the held-out text (so perplexity means something)
    and on one chat exchange (so it answers "The capital of France" with "Paris" and stops)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("trained") / "model"
    shutil.copytree(tiny_hf_model, out)
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = torch.tensor(tok(heldout_text())["input_ids"])
    chat = [{"role": "user", "content": "The capital of France"}, {"role": "assistant", "content": "Paris"}]
    exchange = torch.tensor([tok(tok.apply_chat_template(chat, tokenize=False))["input_ids"]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(60):
        starts = torch.randint(0, len(ids) - 129, (4,))
        batch = torch.stack([ids[s : s + 128] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss + model(input_ids=exchange, labels=exchange).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def trained_fp32(trained_tiny: Path, builder_cache_dir: Path) -> Path:
    return convert(trained_tiny, get_profile("cpu-fp32"), cache_dir=builder_cache_dir, threads=1).path


def _hf_perplexity(model_dir: Path, ids: list[int], window: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), window):
            chunk = torch.tensor([ids[start : start + window]])
            if chunk.shape[1] < 2:
                break
            logp = torch.log_softmax(model(input_ids=chunk).logits[0, :-1].double(), dim=-1)
            total -= float(logp.gather(1, chunk[0, 1:, None]).sum())
            count += chunk.shape[1] - 1
    return math.exp(total / count)


def test_perplexity_matches_transformers_and_ranks_texts(trained_tiny: Path, trained_fp32: Path) -> None:
    from transformers import AutoTokenizer

    text = heldout_text()
    assert len(text) > 3000 and text.isascii()
    ids = AutoTokenizer.from_pretrained(str(trained_tiny))(text)["input_ids"][:300]
    window = 200  # two windows; the first appended in two prefill chunks
    assert window > PREFILL_CHUNK
    ours = perplexity(trained_fp32, text, max_tokens=300, window=window, threads=1)
    reference = _hf_perplexity(trained_tiny, ids, window)
    assert abs(ours - reference) / reference < 1e-3, (ours, reference)

    chars = list(text)  # the same characters in a random order: no words left
    random.Random(0).shuffle(chars)
    shuffled = perplexity(trained_fp32, "".join(chars), max_tokens=300, window=window, threads=1)
    garbage = "".join(random.Random(1).choice("qxzjvkw#%&0123456789 ") for _ in range(800))
    noise = perplexity(trained_fp32, garbage, max_tokens=300, window=window, threads=1)
    assert ours * 1.2 < shuffled < noise, (ours, shuffled, noise)


def test_perplexity_refuses_bad_input(trained_fp32: Path, tmp_path: Path) -> None:
    from slmops_builder.evaluate import EvaluationError

    with pytest.raises(ValueError, match="too short"):
        perplexity(trained_fp32, "a", threads=1)
    with pytest.raises(EvaluationError, match=r"no genai_config\.json"):
        perplexity(tmp_path, "some text here", threads=1)


def test_evaluate_variant_in_a_fresh_process(trained_fp32: Path) -> None:
    prompt = GoldenPromptSpec("The capital of France", 6)
    assert evaluate_folder(trained_fp32, [prompt], threads=1).references == ["Paris"]
    tasks = [TaskExample("The capital of France", "Paris"), TaskExample("The capital of France", "Rome")]
    ev = evaluate_variant(trained_fp32, [prompt], text=heldout_text(), tasks=tasks, threads=1, max_tokens=256)
    m = ev.metrics
    assert ev.references == ["Paris"]
    assert m["task_accuracy"] == 0.5
    assert m["perplexity"] == pytest.approx(
        perplexity(trained_fp32, heldout_text(), max_tokens=256, threads=1), rel=1e-6
    )
    # The evaluating process's own peak, not the (much bigger) pytest process's that started it.
    assert 20 < m["peak_rss_mb"] < 400 and m["decode_tps"] > 0 and m["ttft_ms"] > 0 and m["load_ms"] > 0
    assert m["size_mb"] == pytest.approx(sum(p.stat().st_size for p in trained_fp32.rglob("*") if p.is_file()) / 2**20)


def test_a_task_schema_holds_the_answers_and_is_recorded(trained_fp32: Path) -> None:
    tasks = [TaskExample("The capital of France", '{"city": "Paris"}')]
    free = evaluate_variant(trained_fp32, [], tasks=tasks, threads=1).metrics
    assert free["task_accuracy"] == 0.0 and "task_json_schema" not in free  # it answers plain "Paris"
    schema = {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome"]}},
        "required": ["city"],
        "additionalProperties": False,
        "x-guidance": {"whitespace_flexible": False},
    }
    held = evaluate_variant(trained_fp32, [], tasks=tasks, task_schema=json.dumps(schema), threads=1).metrics
    assert held["task_accuracy"] == 1.0 and held["task_json_schema"] == 1.0


def test_load_tasks_names_file_and_line(tmp_path: Path) -> None:
    good = tmp_path / "tasks.jsonl"
    good.write_text(json.dumps({"input": "2+2=", "output": "4"}) + "\n\n" + json.dumps({"input": "a", "output": "b"}))
    assert load_tasks(good) == [TaskExample("2+2=", "4"), TaskExample("a", "b")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input": "x", "output": "y"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not JSON"):
        load_tasks(bad)
    bad.write_text(json.dumps({"input": "x", "answer": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: expected an object"):
        load_tasks(bad)
    bad.write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        load_tasks(bad)
    with pytest.raises(FileNotFoundError, match="task set not found"):
        load_tasks(tmp_path / "none.jsonl")


def test_gates_pass_fail_and_unmeasured() -> None:
    gates = Gates(max_ppl_ratio=1.05, min_decode_tps=100, max_size_mb=50, min_task_accuracy=0.9)
    results = {r.gate: r for r in check_gates(gates.thresholds(), {"ppl_ratio": 1.2, "decode_tps": 150, "size_mb": 10})}
    assert not results["max_ppl_ratio"].passed and results["max_ppl_ratio"].reason == (
        "max_ppl_ratio: ppl_ratio 1.2x > 1.05x"
    )
    assert results["min_decode_tps"].passed and results["min_decode_tps"].measured == 150
    assert results["max_size_mb"].passed
    unmeasured = results["min_task_accuracy"]
    assert not unmeasured.passed and unmeasured.measured is None and "not measured" in unmeasured.reason
    assert Gates().thresholds() == {} and not Gates().needs_reference() and gates.needs_reference()


def test_a_task_system_prompt_starts_each_chat_the_model_sees(trained_fp32: Path) -> None:
    from slmops_builder.evaluate import _load, task_accuracy

    model, tok, _ = _load(trained_fp32, 1)
    seen: list[object] = []

    class Recording:  # the real tokenizer, with the chats it is given recorded
        def __getattr__(self, name: str) -> object:
            return getattr(tok, name)

        def apply_chat_template(self, messages: str, **kwargs: object) -> str:
            seen.append(json.loads(messages))
            return str(tok.apply_chat_template(messages, **kwargs))

    tasks = [TaskExample("The capital of France", "Paris")]
    assert task_accuracy(model, Recording(), tasks) == 1.0
    task_accuracy(model, Recording(), tasks, system="Reply in one word.")
    user = {"role": "user", "content": "The capital of France"}
    assert seen == [[user], [{"role": "system", "content": "Reply in one word."}, user]]

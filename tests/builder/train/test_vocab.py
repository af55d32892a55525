"""Vocabulary trimming on the tiny model: exact tokenization and logits on the task's texts, any text
still encodable, onnxruntime-genai reads the trimmed model, clear errors, and a distillation into a
trimmed student that keeps the KL term, and a context window that must hold the training length."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnxruntime_genai as og
import pytest
import torch
from typer.testing import CliRunner

from slmops_builder.cli import app
from slmops_builder.convert import convert
from slmops_builder.profiles import get_profile
from slmops_builder.train.distill import DistillConfig, distill
from slmops_builder.train.examples import write_jsonl
from slmops_builder.train.generation import OrtGenerator
from slmops_builder.train.hf_models import load_causal_lm, load_tokenizer, prompt_text
from slmops_builder.train.tasks import generate_splits
from slmops_builder.train.vocab import VOCAB_FILE, read_kept_ids, trim_vocab

UNSEEN = "Zebras quickly vault over 7 jumbled xylophones!"


def _texts(model_dir: Path, n: int = 12) -> list[str]:
    tok = load_tokenizer(model_dir)
    examples = generate_splits(n, 0, 0, seed=21).train
    return [t for ex in examples for t in (prompt_text(tok, ex.prompt_messages), ex.output)]


@pytest.fixture(scope="module")
def trimmed(trainable_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trimmed") / "model"
    trim_vocab(trainable_tiny, _texts(trainable_tiny), out, keep_top=0)
    return out


def test_trimming_keeps_the_task_tokens_exactly_and_slices_the_logits(trainable_tiny: Path, trimmed: Path) -> None:
    src_tok, tok = load_tokenizer(trainable_tiny), load_tokenizer(trimmed)
    kept = read_kept_ids(trimmed)
    assert kept is not None and kept == sorted(kept)
    assert 256 < len(kept) < len(src_tok)  # the byte tokens and the task's tokens, not the whole vocabulary
    config = json.loads((trimmed / "config.json").read_text())
    assert config["vocab_size"] == len(kept) == len(tok)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert kept[config[key]] == json.loads((trainable_tiny / "config.json").read_text())[key]
    assert tok.eos_token == src_tok.eos_token and kept[tok.eos_token_id] == src_tok.eos_token_id

    text = _texts(trainable_tiny, 2)[0]
    src_ids = src_tok(text, add_special_tokens=False)["input_ids"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert [kept[i] for i in ids] == src_ids
    with torch.no_grad():
        src_logits = load_causal_lm(trainable_tiny)(input_ids=torch.tensor([src_ids])).logits[0]
        logits = load_causal_lm(trimmed)(input_ids=torch.tensor([ids])).logits[0]
    assert logits.shape == (len(ids), len(kept))
    torch.testing.assert_close(logits, src_logits[:, kept])

    unseen = tok(UNSEEN, add_special_tokens=False)["input_ids"]
    assert max(unseen) < len(kept)
    assert len(unseen) > len(src_tok(UNSEEN, add_special_tokens=False)["input_ids"])  # spelt with smaller pieces
    assert tok.decode(unseen) == UNSEEN


def test_onnxruntime_genai_reads_the_trimmed_model_and_tokenizer(trimmed: Path, builder_cache_dir: Path) -> None:
    converted = convert(trimmed, get_profile("cpu-fp32"), cache_dir=builder_cache_dir, threads=1)
    gen = OrtGenerator(converted.path, threads=1)
    tok = load_tokenizer(trimmed)
    for text in [*_texts(trimmed, 2), UNSEEN]:
        assert list(gen.tokenizer.encode(text)) == tok(text, add_special_tokens=False)["input_ids"]
    ids = tok(_texts(trimmed, 2)[0], add_special_tokens=False)["input_ids"]
    params = og.GeneratorParams(gen.model)
    params.set_search_options(do_sample=False, max_length=len(ids) + 8)
    generator = og.Generator(gen.model, params)
    generator.append_tokens(ids)
    ort_ids: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        ort_ids.append(int(generator.get_next_tokens()[0]))
    with torch.no_grad():
        hf = load_causal_lm(trimmed).generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert ort_ids == hf[0, len(ids) :].tolist()  # the random model writes bytes: compare ids, not texts


def test_trimming_refuses_what_it_cannot_do(trainable_tiny: Path, tmp_path: Path) -> None:
    no_fast = tmp_path / "no-fast"
    shutil.copytree(trainable_tiny, no_fast)
    (no_fast / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json is missing"):
        trim_vocab(no_fast, ["hi"], tmp_path / "out")
    wordpiece = tmp_path / "wordpiece"
    shutil.copytree(trainable_tiny, wordpiece)
    tj = json.loads((wordpiece / "tokenizer.json").read_text())
    tj["model"]["type"] = "WordPiece"
    (wordpiece / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match=r"supports byte-level BPE tokenizers.*'WordPiece'"):
        trim_vocab(wordpiece, ["hi"], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_distilling_into_a_trimmed_student_with_a_shorter_context_keeps_the_kl_term(
    trainable_tiny: Path, tmp_path: Path
) -> None:
    splits = generate_splits(16, 0, 0, seed=23)
    with pytest.raises(ValueError, match="max_length 256 is longer than context_length 128"):
        DistillConfig(context_length=128)
    cfg = DistillConfig(
        keep_layers=1,
        max_steps=10,
        learning_rate=3e-3,
        batch_size=4,
        threads=1,
        vocab_top=0,
        max_length=128,
        context_length=128,
    )
    result = distill(trainable_tiny, splits.train, tmp_path / "run", cfg)
    assert result.mode == "kl+ce" and result.init_dir is not None
    assert all(h["kl"] is not None and h["kl"] >= 0 for h in result.history)
    losses = [h["train_loss"] for h in result.history]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
    kept = read_kept_ids(result.student_dir)
    assert kept is not None and kept == read_kept_ids(result.init_dir)
    config = json.loads((result.student_dir / "config.json").read_text())
    assert (config["vocab_size"], config["max_position_embeddings"]) == (len(kept), 128)
    assert json.loads((result.init_dir / "slmops_pruned.json").read_text())["layers"] == [0]
    assert (result.student_dir / VOCAB_FILE).is_file()
    assert not (tmp_path / "run" / "student-init-all-tokens").exists()


def test_cli_distill_refuses_a_context_shorter_than_the_training_length(trainable_tiny: Path, tmp_path: Path) -> None:
    write_jsonl(generate_splits(2, 0, 0, seed=24).train, tmp_path / "inputs.jsonl")
    args = ["distill", "-t", str(trainable_tiny), "-d", str(tmp_path / "inputs.jsonl"), "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--vocab-top", "0", "--context-length", "64"])
    assert result.exit_code == 1
    assert "max_length 256 is longer than context_length 64" in result.output
    assert not (tmp_path / "out" / "teacher.jsonl").exists()  # refused before the teacher ran

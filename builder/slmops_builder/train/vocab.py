"""Vocabulary trimming: a copy of a model that knows only the tokens a task needs.

A 135M-parameter model spends 28M of its parameters (and, in a 4-8-layer student, most of its compute
per token) on a 49k-token embedding and output head, while a narrow task uses a few hundred tokens.
`trim_vocab` keeps the tokens of the task's texts (and their spellings capitalised or not, with and
without a leading space), the `keep_top` most frequent tokens of the tokenizer (byte-level BPE ids
follow merge order, so low ids are the common ones), the special tokens and the 256 byte tokens,
closed under the BPE merges that make them; every merge whose parts or result fell out is dropped.
Ids are renumbered in their old order, the embedding and output rows are sliced to match, and the
tokenizer is rewritten. Then:

- any text still tokenizes (the byte tokens are kept; a word whose merge fell out is spelt with
  smaller pieces), and
- a text made of kept tokens tokenizes exactly as before, renumbered: every merge that built its
  tokens is kept, and a dropped merge was never the one BPE applied. `trim_vocab` checks this on the
  task's texts and refuses to write a model that breaks it.

The kept ids are written to slmops_vocab.json (`kept[new_id] == old_id`), so a distillation can map
the teacher's logits onto the student's vocabulary.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["VOCAB_FILE", "TrimmedVocab", "read_kept_ids", "trim_vocab"]

VOCAB_FILE = "slmops_vocab.json"
_SPACE = "\u0120"  # byte-level BPE's spelling of a leading space ("Ġ")
_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id")


@dataclass(frozen=True)
class TrimmedVocab:
    path: Path
    kept: list[int]  # kept[new_id] == old_id
    source_size: int
    merges_kept: int

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "size": len(self.kept), "source_size": self.source_size}


def _merge_pair(merge: Any) -> tuple[str, str]:
    if isinstance(merge, str):
        a, b = merge.split(" ", 1)
        return a, b
    return str(merge[0]), str(merge[1])


def _variants(token: str) -> set[str]:
    """A task token and its spellings at the start of a text or after a space, capitalised or not:
    a word seen mid-sentence in the task's texts keeps its own token when a user starts with it."""
    word = token[1:] if token.startswith(_SPACE) else token
    forms = {word, word.lower(), word[:1].upper() + word[1:]}
    return forms | {_SPACE + f for f in forms}


def _closed(kept: set[str], merges: Sequence[tuple[str, str]], vocab: dict[str, int]) -> set[str]:
    """`kept` plus every token a merge needs to build a kept token, until nothing is added."""
    out = set(kept)
    changed = True
    while changed:
        changed = False
        for a, b in merges:
            if a + b in out and a + b in vocab and not (a in out and b in out):
                out.update((a, b))
                changed = True
    return out


def read_kept_ids(model_dir: Path) -> list[int] | None:
    """The kept ids of a trimmed model (kept[new_id] == the source's id), or None when untrimmed."""
    path = Path(model_dir) / VOCAB_FILE
    if not path.is_file():
        return None
    return [int(i) for i in json.loads(path.read_text())["kept"]]


def trim_vocab(model_dir: Path, texts: Iterable[str], out: Path, *, keep_top: int = 4096) -> TrimmedVocab:
    """Write to `out` a copy of the HF model in `model_dir` that keeps only the tokens described above."""
    import torch
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, out = Path(model_dir), Path(out)
    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise FileNotFoundError(f"vocabulary trimming needs a fast tokenizer file; {tj_path} is missing")
    tj = json.loads(tj_path.read_text())
    bpe = tj.get("model", {})
    if bpe.get("type") != "BPE" or not isinstance(bpe.get("vocab"), dict):
        raise ValueError(f"vocabulary trimming supports byte-level BPE tokenizers; {tj_path} has {bpe.get('type')!r}")
    vocab: dict[str, int] = bpe["vocab"]
    id_to_token = {i: t for t, i in vocab.items()}
    merges = [_merge_pair(m) for m in bpe.get("merges", [])]
    added = {int(t["id"]): t["content"] for t in tj.get("added_tokens", [])}
    source_size = max([*vocab.values(), *added]) + 1

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    texts = list(texts)
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    task_tokens = {id_to_token[i] for ids in encoded for i in ids if i in id_to_token}
    tokens = {v for t in task_tokens for v in _variants(t) if v in vocab}
    tokens |= {id_to_token[i] for i in range(min(keep_top, source_size)) if i in id_to_token}
    tokens |= {c for c in ByteLevel.alphabet() if c in vocab}
    tokens = _closed(tokens, merges, vocab)
    kept = sorted({vocab[t] for t in tokens} | set(added))
    new_id = {old: new for new, old in enumerate(kept)}

    tj["model"]["vocab"] = {id_to_token[old]: new_id[old] for old in kept if old in id_to_token}
    kept_merges = [m for m in merges if m[0] in tokens and m[1] in tokens and m[0] + m[1] in tokens]
    tj["model"]["merges"] = [list(m) for m in kept_merges]
    for t in tj.get("added_tokens", []):
        t["id"] = new_id[int(t["id"])]

    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    index = torch.tensor(kept, dtype=torch.long)
    rows = model.get_input_embeddings().weight.data[index].clone()
    new_embed = torch.nn.Embedding.from_pretrained(rows, freeze=False)
    model.set_input_embeddings(new_embed)
    head = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False):
        head.weight = new_embed.weight
    else:
        head.weight = torch.nn.Parameter(head.weight.data[index].clone())
        if getattr(head, "bias", None) is not None:
            head.bias = torch.nn.Parameter(head.bias.data[index].clone())
    head.out_features = len(kept)
    model.config.vocab_size = len(kept)
    configs = [model.config, model.generation_config]
    for cfg in configs:
        for key in _ID_KEYS:
            value = getattr(cfg, key, None)
            if value is None:
                continue
            ids = value if isinstance(value, list) else [value]
            if any(int(i) not in new_id for i in ids):
                raise ValueError(f"the model's {key} {value} is not a kept token")
            mapped = [new_id[int(i)] for i in ids]
            setattr(cfg, key, mapped if isinstance(value, list) else mapped[0])

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, tmp / name)
    tokenizer_config = tmp / "tokenizer_config.json"
    if tokenizer_config.is_file():
        tc = json.loads(tokenizer_config.read_text())
        if "added_tokens_decoder" in tc:
            tc["added_tokens_decoder"] = {str(new_id[int(k)]): v for k, v in tc["added_tokens_decoder"].items()}
        tokenizer_config.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    (tmp / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    check = AutoTokenizer.from_pretrained(str(tmp))
    for text, ids in zip(texts, encoded, strict=True):
        got = check(text, add_special_tokens=False)["input_ids"]
        if got != [new_id[i] for i in ids]:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(f"the trimmed tokenizer splits {text!r} differently from the source; not written")
    record = {"source": str(model_dir.resolve()), "source_size": source_size, "keep_top": keep_top, "kept": kept}
    (tmp / VOCAB_FILE).write_text(json.dumps(record) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return TrimmedVocab(out, kept, source_size, len(kept_merges))

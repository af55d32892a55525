"""Lossless import of a GGUF's 4-bit weights into an onnxruntime-genai int4 model.

A llama.cpp Q4_1 block of 32 weights holds a scale `d`, a minimum `m` (both float16) and 32 four-bit
codes `q`; each weight is `d*q + m`. Q4_0 holds `d` and codes, each weight `d*(q - 8)`; Q8_0 holds `d`
and 32 signed bytes, each weight `d*q`. onnxruntime's `MatMulNBits` computes with `scale*(q - zp)` per
block of 32 along K, so:

- Q4_0 is `MatMulNBits` as it is (4 bits, no zero point: the default 8).
- Q4_1 is `MatMulNBits` with the codes and zero point 0, plus the minima term: for an output n,
  `sum_b m[n, b] * sum_{k in block b} x[k]`, a MatMul of the per-block sums of x (`K/32` values, one
  small MatMul against a 0/1 block matrix) with `m` (`K/32 x N`, float32) added to the output. The
  kernel stays the fast integer path; the float zero points that would express `m` directly fall back
  to a much slower path.
- Q8_0 (SmolLM2's tied embedding / lm_head) is an 8-bit `MatMulNBits` and an 8-bit
  `GatherBlockQuantized` sharing one tensor of codes `q + 128` (the 8-bit default zero point). In a
  model built with float32 compute (accuracy level < 4) the lm_head is instead two 4-bit halves
  (`16d*(hi - 8) + d*lo`, exact), because 8-bit MatMulNBits has no float32 kernel on CPU.

The weights are exact either way; the arithmetic follows the model's `accuracy_level`: 4 quantizes the
activations to int8 per block inside the kernel (fast; as llama.cpp does with Q8_1 activations), 1
computes in float32 (logits match the float32 reference, at a lower speed).
`float_compute` names projections (`FLOAT_COMPUTE_PROJECTIONS`) computed in float32 in a model built
with level 4: most of level 4's perplexity cost comes from `down_proj`, whose input (the gated MLP
activation) has the widest range, so float32 there alone brings it back to the float32 reference's
for a fraction of the speed that all-float32 costs.

`rewrite` takes the model builder's int4 output (block 32) for the model folder the GGUF was imported
into and replaces every quantized weight with the GGUF's own codes, scales and minima. Before it writes
anything it checks that each GGUF tensor, dequantized, equals the model folder's float32 weight bit for
bit, so a wrong tensor mapping or a folder from another GGUF is refused rather than shipped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from onnx import GraphProto, NodeProto, numpy_helper

__all__ = [
    "FLOAT_COMPUTE_PROJECTIONS",
    "FORMAT_VERSION",
    "LOSSLESS_TYPES",
    "BlockWeights",
    "LosslessImportError",
    "check_gguf",
    "read_block_weights",
    "rewrite",
]

BLOCK = 32
# Bump when `rewrite` changes what it writes: part of the convert step's cache key.
FORMAT_VERSION = 2
# GGML types a weight may have for the lossless import: Q4_0/Q4_1 for layers, Q8_0 too for the lm_head.
LOSSLESS_TYPES = ("Q4_0", "Q4_1")
_HEAD_TYPES = ("Q4_0", "Q4_1", "Q8_0")
_LAYER_TENSORS = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
_HF_LAYER_PREFIX = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
# The model builder's projections (its node names), as `float_compute` names them.
FLOAT_COMPUTE_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")
_SUPPORTED_ARCHITECTURES = ("llama",)
_NODE = re.compile(r"^/model/layers\.(\d+)/(?:attn|mlp)/(\w+)/MatMul_Q4$")
_F32 = npt.NDArray[np.float32]
_U8 = npt.NDArray[np.uint8]


class LosslessImportError(ValueError):
    """The GGUF cannot be imported losslessly (wrong block types, architecture or model folder)."""


@dataclass(frozen=True)
class BlockWeights:
    """One weight as MatMulNBits parts, rows in the model folder's order: `scales*(codes - zero) + mins`."""

    bits: int  # 4 or 8
    codes: _U8  # (N, K/32, 32) unsigned codes, one per weight
    scales: _F32  # (N, K/32)
    mins: _F32 | None  # (N, K/32) for Q4_1, else None
    ggml_type: str
    zero: int | None = None  # the zero point, when not the default (0 with minima, else 2**(bits-1))

    @property
    def zero_point(self) -> int:
        if self.zero is not None:
            return self.zero
        return 0 if self.mins is not None else 2 ** (self.bits - 1)

    def split_nibbles(self) -> tuple[BlockWeights, BlockWeights]:
        """An 8-bit weight as two 4-bit ones that sum to it exactly: with u = 16*hi + lo,
        d*(u - 128) = 16d*(hi - 8) + d*(lo - 0). Each half has a float32-compute kernel on CPU."""
        if self.bits != 8 or self.mins is not None:
            raise ValueError("only 8-bit weights without minima split into nibbles")
        high = (self.codes >> 4).astype(np.uint8)
        low = (self.codes & 0x0F).astype(np.uint8)
        hi = BlockWeights(4, high, (self.scales * np.float32(16)).astype(np.float32), None, self.ggml_type)
        lo = BlockWeights(4, low, self.scales, None, self.ggml_type, zero=0)
        return hi, lo

    def dequantize(self) -> _F32:
        """The weights as float32 (N, K), computed the way llama.cpp and transformers do."""
        q = self.codes.astype(np.float32) - np.float32(self.zero_point)
        w = self.scales[..., None] * q
        if self.mins is not None:
            w = w + self.mins[..., None]
        return w.reshape(w.shape[0], -1).astype(np.float32)

    def take_rows(self, index: npt.NDArray[np.intp]) -> BlockWeights:
        mins = None if self.mins is None else self.mins[index]
        return BlockWeights(self.bits, self.codes[index], self.scales[index], mins, self.ggml_type, self.zero)

    def packed_zero_points(self) -> _U8:
        """MatMulNBits' zero_points input: (N * ceil(K/32 * bits / 8),) uint8, two 4-bit values a byte."""
        n, nb = self.scales.shape
        if self.bits == 8:
            return np.full(n * nb, self.zero_point, dtype=np.uint8)
        return np.full(n * ((nb + 1) // 2), self.zero_point | (self.zero_point << 4), dtype=np.uint8)

    def packed(self) -> _U8:
        """MatMulNBits' B input: (N, K/32, 32*bits/8), two 4-bit codes a byte (low nibble first)."""
        if self.bits == 8:
            return np.ascontiguousarray(self.codes)
        return np.ascontiguousarray(self.codes[..., 0::2] | (self.codes[..., 1::2] << 4)).astype(np.uint8)


def _concat(parts: list[BlockWeights]) -> BlockWeights:
    first = parts[0]
    if any(p.bits != first.bits or (p.mins is None) != (first.mins is None) for p in parts):
        kinds = ", ".join(p.ggml_type for p in parts)
        raise LosslessImportError(f"fused projections have different block types ({kinds}); cannot fuse them")
    mins = None if first.mins is None else np.concatenate([p.mins for p in parts if p.mins is not None])
    return BlockWeights(
        first.bits,
        np.concatenate([p.codes for p in parts]),
        np.concatenate([p.scales for p in parts]),
        mins,
        first.ggml_type,
    )


def _decode(ggml_type: str, raw: _U8, n: int, k: int) -> BlockWeights:
    """Decode llama.cpp blocks (rows of raw bytes) into codes, scales and minima."""
    if k % BLOCK:
        raise LosslessImportError(f"row length {k} is not a multiple of the block size {BLOCK}")
    nb = k // BLOCK
    if ggml_type == "Q8_0":
        blocks = raw.reshape(n, nb, 34)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        q = blocks[..., 2:].copy().view(np.int8).astype(np.int16) + 128
        return BlockWeights(8, q.astype(np.uint8), d, None, ggml_type)
    if ggml_type == "Q4_0":
        blocks = raw.reshape(n, nb, 18)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        qs, m = blocks[..., 2:], None
    elif ggml_type == "Q4_1":
        blocks = raw.reshape(n, nb, 20)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., 4:]
    else:
        raise LosslessImportError(f"GGML type {ggml_type} has no lossless int4 form")
    # llama.cpp: byte j holds weight j in its low nibble and weight j+16 in its high nibble.
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.uint8)
    return BlockWeights(4, codes, d, m, ggml_type)


def _tensors(gguf_path: Path) -> dict[str, tuple[str, tuple[int, int], _U8]]:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_path)
    except Exception as exc:  # the reader raises assorted errors on truncated or garbled files
        raise LosslessImportError(f"{gguf_path} is not a readable GGUF file: {exc}") from exc
    out: dict[str, tuple[str, tuple[int, int], _U8]] = {}
    for t in reader.tensors:
        if len(t.shape) != 2:
            continue
        k, n = (int(x) for x in t.shape)  # GGUF lists dimensions innermost first
        out[t.name] = (t.tensor_type.name, (n, k), np.asarray(t.data))
    return out


def _head_name(tensors: Mapping[str, object]) -> str:
    return "output.weight" if "output.weight" in tensors else "token_embd.weight"


def check_gguf(gguf_path: Path) -> dict[str, str]:
    """Check that every projection of the GGUF is in 4-bit blocks; returns tensor name -> GGML type.

    Raises LosslessImportError naming the tensors that are not (for example an F16 or Q6_K GGUF).
    """
    tensors = _tensors(Path(gguf_path))
    types = {name: kind for name, (kind, _, _) in tensors.items()}
    layers = {n for n in types if re.match(r"^blk\.\d+\.(attn_[qkv]|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$", n)}
    if not layers:
        raise LosslessImportError(f"{gguf_path} has no llama projection tensors (blk.N.attn_q.weight, ...)")
    bad = sorted(f"{n} ({types[n]})" for n in layers if types[n] not in LOSSLESS_TYPES)
    head = _head_name(types)
    if types.get(head) not in _HEAD_TYPES:
        bad.append(f"{head} ({types.get(head, 'missing')})")
    if bad:
        shown = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
        raise LosslessImportError(
            f"{gguf_path.name} cannot be imported losslessly: its projections must be {' or '.join(LOSSLESS_TYPES)}"
            f" blocks (lm_head also Q8_0), but found {shown}; use cpu-int4 or cpu-int8 instead"
        )
    return types


def read_block_weights(gguf_path: Path, config: Mapping[str, Any]) -> dict[str, BlockWeights]:
    """The GGUF's projections as BlockWeights keyed by the model folder's weight names (rows un-permuted
    for q/k as transformers does), plus `lm_head.weight`."""
    arch = config.get("model_type")
    if arch not in _SUPPORTED_ARCHITECTURES:
        raise LosslessImportError(
            f"lossless GGUF import supports {', '.join(_SUPPORTED_ARCHITECTURES)} models, not {arch!r}"
        )
    check_gguf(gguf_path)
    tensors = _tensors(Path(gguf_path))
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    out: dict[str, BlockWeights] = {}
    for layer in range(int(config["num_hidden_layers"])):
        for hf, gg in _LAYER_TENSORS.items():
            name = f"blk.{layer}.{gg}.weight"
            if name not in tensors:
                raise LosslessImportError(f"{gguf_path.name} has no tensor {name}")
            kind, (n, k), raw = tensors[name]
            weights = _decode(kind, raw, n, k)
            if hf in ("q_proj", "k_proj"):
                weights = weights.take_rows(_unpermute_index(n, n_head, n_kv if hf == "k_proj" else None))
            out[f"model.layers.{layer}.{_HF_LAYER_PREFIX[hf]}.{hf}.weight"] = weights
    kind, (n, k), raw = tensors[_head_name(tensors)]
    out["lm_head.weight"] = _decode(kind, raw, n, k)
    return out


def _unpermute_index(rows: int, n_head: int, n_kv: int | None) -> npt.NDArray[np.intp]:
    """Row order that undoes llama.cpp's q/k permutation (transformers' `_reverse_permute_weights`)."""
    if n_kv is not None and n_head != n_kv:
        n_head = n_kv
    idx = np.arange(rows).reshape(n_head, rows // n_head // 2, 2).swapaxes(2, 1).reshape(rows)
    return idx.astype(np.intp)


def _hf_weights(model_dir: Path) -> Iterator[tuple[str, _F32]]:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise LosslessImportError(f"{model_dir} has no .safetensors weights to check the GGUF against")
    for path in files:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.endswith("proj.weight") or key in ("lm_head.weight", "model.embed_tokens.weight"):
                    yield key, f.get_tensor(key)


def _check_against_folder(weights: Mapping[str, BlockWeights], model_dir: Path, tied: bool) -> None:
    """Each GGUF weight, dequantized, must equal the folder's float32 weight bit for bit."""
    folder = dict(_hf_weights(model_dir))
    if tied and "model.embed_tokens.weight" in folder:  # a tied lm_head is saved as the embedding only
        folder.setdefault("lm_head.weight", folder["model.embed_tokens.weight"])
    for name, block in weights.items():
        value = folder.get(name)
        if value is None:
            raise LosslessImportError(f"{model_dir} has no weight {name} to check the GGUF against")
        deq = block.dequantize()
        if deq.shape != value.shape or not np.array_equal(deq, value.astype(np.float32)):
            diff = float(np.max(np.abs(deq - value))) if deq.shape == value.shape else float("nan")
            raise LosslessImportError(
                f"GGUF weights for {name} differ from the model folder's (shape {deq.shape} vs {value.shape},"
                f" max |diff| {diff:.3g}): the folder was not imported from this GGUF"
            )


def rewrite(folder: Path, gguf_path: Path, model_dir: Path, *, float_compute: Collection[str] = ()) -> dict[str, int]:
    """Replace the quantized weights of the model builder's int4 output in `folder` with the GGUF's;
    the projections named in `float_compute` compute in float32 (accuracy level 1).

    Returns counts of what changed ({"matmuls": .., "with_minima": .., "lm_head_bits": ..,
    "float_compute": ..}).
    """
    import onnx
    from onnx import helper

    folder, gguf_path, model_dir = Path(folder), Path(gguf_path), Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    weights = read_block_weights(gguf_path, config)
    tied = bool(config.get("tie_word_embeddings", False))
    _check_against_folder(weights, model_dir, tied)

    model_path = folder / "model.onnx"
    model = onnx.load(str(model_path), load_external_data=True)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    after: dict[str, list[onnx.NodeProto]] = {}  # node name -> the nodes to place right after it
    block_sums: dict[str, str] = {}  # input tensor -> its per-block sums
    counts = {"matmuls": 0, "with_minima": 0, "lm_head_bits": 0, "float_compute": 0}
    unknown = set(float_compute) - set(FLOAT_COMPUTE_PROJECTIONS)
    if unknown:
        raise LosslessImportError(
            f"float_compute: unknown projections {sorted(unknown)}; known: {FLOAT_COMPUTE_PROJECTIONS}"
        )

    def set_init(name: str, array: np.ndarray) -> None:
        tensor = numpy_helper.from_array(array, name)
        if name in inits:
            inits[name].CopyFrom(tensor)
        else:
            graph.initializer.append(tensor)
            inits[name] = graph.initializer[-1]

    def source(node_name: str) -> BlockWeights:
        if node_name == "/lm_head/MatMul_Q4":
            return weights["lm_head.weight"]
        match = _NODE.match(node_name)
        if match is None:
            raise LosslessImportError(f"model builder node {node_name} has no GGUF counterpart")
        layer, proj = match.groups()
        parts = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
        names = parts.get(proj, [proj])
        try:
            return _concat([weights[f"model.layers.{layer}.{_HF_LAYER_PREFIX[p]}.{p}.weight"] for p in names])
        except KeyError:
            raise LosslessImportError(f"model builder node {node_name} has no GGUF counterpart") from None

    for node in list(graph.node):
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if _projection(node.name) in float_compute and attrs.get("accuracy_level") != 1:
            others = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*others, helper.make_attribute("accuracy_level", 1)])
            attrs["accuracy_level"] = 1
            counts["float_compute"] += 1
        if attrs.get("block_size") != BLOCK:
            raise LosslessImportError(f"{node.name}: model builder used block size {attrs.get('block_size')}, not 32")
        w = source(node.name)
        n, nb = w.scales.shape
        if (n, nb * BLOCK) != (attrs["N"], attrs["K"]):
            raise LosslessImportError(f"{node.name}: GGUF shape {(n, nb * BLOCK)} != graph {(attrs['N'], attrs['K'])}")
        set_init(node.input[1], w.packed())  # also what a shared embedding gathers from
        set_init(node.input[2], w.scales)
        for a in node.attribute:
            if a.name == "bits":
                a.i = w.bits
        del node.input[3:]
        counts["matmuls"] += 1
        if node.name == "/lm_head/MatMul_Q4":
            counts["lm_head_bits"] = w.bits
        if w.bits == 8 and attrs.get("accuracy_level", 4) < 4:
            # An 8-bit MatMulNBits has no float32-compute kernel on CPU (it falls back to a much slower
            # path): compute it as two exact 4-bit halves instead.
            after[node.name] = _split_matmul(node, w, attrs, set_init)
            counts["split_8bit"] = counts.get("split_8bit", 0) + 1
            continue
        # Explicit zero points (the defaults, or 0 with minima): the integer kernel is as fast or faster with them.
        zp_name = node.input[1] + "_zero_points"
        set_init(zp_name, w.packed_zero_points())
        node.input.append(zp_name)
        if w.mins is None:
            continue
        counts["with_minima"] += 1
        x = node.input[0]
        added = after.setdefault(node.name, [])
        if x not in block_sums:
            ones_name = f"slmops_block_ones_{attrs['K']}"
            if ones_name not in inits:
                set_init(ones_name, np.repeat(np.eye(nb, dtype=np.float32), BLOCK, axis=0))  # (K, K/32)
            block_sums[x] = f"{node.name}/block_sums"
            added.append(helper.make_node("MatMul", [x, ones_name], [block_sums[x]], name=block_sums[x] + "_op"))
        mins_name = node.input[1] + "_minima"
        set_init(mins_name, np.ascontiguousarray(w.mins.T))  # (K/32, N)
        out = node.output[0]
        raw = out + "_codes"
        node.output[0] = raw
        corr = f"{node.name}/minima_term"
        added.append(helper.make_node("MatMul", [block_sums[x], mins_name], [corr], name=corr + "_op"))
        added.append(helper.make_node("Add", [raw, corr], [out], name=f"{node.name}/add_minima"))

    _rewrite_embedding(graph, producers, weights["lm_head.weight"], tied)
    used = {i for n in graph.node for i in n.input} | {i for ns in after.values() for n in ns for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    ordered = [m for node in graph.node for m in (node, *after.get(node.name, []))]
    del graph.node[:]
    graph.node.extend(ordered)

    data_name = "model.onnx.data"
    for stale in (model_path, folder / data_name):
        stale.unlink(missing_ok=True)
    onnx.save_model(model, str(model_path), save_as_external_data=True, location=data_name, size_threshold=1024)
    (folder / data_name).chmod(0o644)  # onnx writes it owner-only; the model builder's files are 0644
    return counts


def _projection(node_name: str) -> str:
    """The projection a MatMulNBits node computes ("lm_head", "down_proj", ...); "" for another node."""
    if node_name == "/lm_head/MatMul_Q4":
        return "lm_head"
    match = _NODE.match(node_name)
    return match.group(2) if match else ""


def _split_matmul(
    node: NodeProto, w: BlockWeights, attrs: Mapping[str, Any], set_init: Callable[[str, np.ndarray], None]
) -> list[NodeProto]:
    """Turn an 8-bit MatMulNBits node into two 4-bit ones (see `BlockWeights.split_nibbles`) plus
    their Add; `node` becomes the high half. Returns the nodes to place after it."""
    from onnx import helper

    hi, lo = w.split_nibbles()
    x, base, out = node.input[0], node.input[1], node.output[0]
    names: dict[str, list[str]] = {}
    for tag, part in (("hi", hi), ("lo", lo)):
        names[tag] = [f"{base}_{tag}", f"{base}_{tag}_scales", f"{base}_{tag}_zero_points"]
        set_init(names[tag][0], part.packed())
        set_init(names[tag][1], part.scales)
        set_init(names[tag][2], part.packed_zero_points())
    del node.input[1:]
    node.input.extend(names["hi"])
    node.output[0] = out + "_hi"
    for a in node.attribute:
        if a.name == "bits":
            a.i = 4
    lo_node = helper.make_node(
        "MatMulNBits",
        [x, *names["lo"]],
        [out + "_lo"],
        name=node.name + "_lo",
        domain="com.microsoft",
        K=attrs["K"],
        N=attrs["N"],
        bits=4,
        block_size=BLOCK,
        accuracy_level=attrs["accuracy_level"],
    )
    return [lo_node, helper.make_node("Add", [out + "_hi", out + "_lo"], [out], name=node.name + "_add_halves")]


def _rewrite_embedding(graph: GraphProto, producers: Mapping[str, NodeProto], head: BlockWeights, tied: bool) -> None:
    """Point the shared embedding lookup (GatherBlockQuantized over the lm_head codes) at the GGUF's
    codes: new row width and bits. An untied model keeps its float Gather (the folder's exact weights)."""
    nodes = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    if not nodes:
        if tied:
            raise LosslessImportError("tied embedding but the model builder wrote no GatherBlockQuantized node")
        return
    if head.mins is not None:
        raise LosslessImportError("a Q4_1 embedding shared with the lm_head has no exact GatherBlockQuantized form")
    n, nb = head.scales.shape
    shape_name = f"slmops_embedding_shape_{n}x{nb * BLOCK * head.bits // 8}"
    graph.initializer.append(numpy_helper.from_array(np.array([n, nb * BLOCK * head.bits // 8], np.int64), shape_name))
    for node in nodes:
        reshape = producers.get(node.input[0])
        if reshape is None or reshape.op_type != "Reshape":
            raise LosslessImportError(f"{node.name}: expected its data from a Reshape of the lm_head codes")
        reshape.input[1] = shape_name
        for a in node.attribute:
            if a.name == "bits":
                a.i = head.bits

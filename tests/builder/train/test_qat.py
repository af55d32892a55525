"""Quantization-aware distillation: the torch int4 grid is onnxruntime's RTN bit for bit, training on
it takes the gradient at the quantized weights, and a student distilled with `qat_steps` converts to
cpu-int4 with every weight (embedding and lm_head included) exactly as it was trained."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from slmops_builder.cli import app
from slmops_builder.convert import convert
from slmops_builder.profiles import get_profile
from slmops_builder.train.adapters import _dequantize_nbits
from slmops_builder.train.distill import DistillConfig, distill
from slmops_builder.train.examples import write_jsonl
from slmops_builder.train.qat import QuantAwareWeights, int4_rtn
from slmops_builder.train.tasks import generate_splits

_NODE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul_Q4$")


def _onnxruntime_rtn(weight: np.ndarray, block: int = 32) -> np.ndarray:
    """`weight` ([N, K]) quantized by onnxruntime's own symmetric 4-bit quantizer, dequantized."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    n, k = weight.shape
    blocks = k // block
    packed = np.zeros((n, blocks, block // 2), dtype=np.uint8)
    scales = np.zeros(n * blocks, dtype=np.float32)
    zero_points = np.zeros(n * ((blocks + 1) // 2), dtype=np.uint8)
    quantize_matmul_4bits(packed, np.ascontiguousarray(weight.T), scales, zero_points, block, n, k, True)
    return _dequantize_nbits(packed, scales, None, n, k, 4, block)


def test_int4_rtn_is_onnxruntimes_rtn_bit_for_bit_and_idempotent() -> None:
    import torch

    torch.manual_seed(0)
    weight = torch.randn(96, 128) * 0.05
    weight[3, 32:64] = 0.0  # an all-zero block stays zero (no division by a zero scale)
    weight[5, :32] = 1e-3  # a block of equal weights: each is its own extreme
    quantized = int4_rtn(weight)
    assert np.array_equal(quantized.numpy(), _onnxruntime_rtn(weight.numpy()))
    assert torch.equal(int4_rtn(quantized), quantized)
    assert torch.equal(quantized[3, 32:64], torch.zeros(32))
    assert len(torch.unique(quantized[7, :32])) <= 16 and not torch.equal(quantized, weight)
    with pytest.raises(ValueError, match="does not split into blocks of 32"):
        int4_rtn(torch.zeros(4, 48))


def test_quantized_weights_take_the_gradient_at_the_grid_and_come_back() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    qat = QuantAwareWeights(model)
    assert len(qat.params) == 8  # q, k, v, o, gate, up, down and the tied embedding / lm_head table
    assert any(p is model.model.embed_tokens.weight for p in qat.params)
    down = model.model.layers[0].mlp.down_proj.weight
    ids = torch.tensor([[1, 5, 9, 2]])

    def grad() -> torch.Tensor:
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        assert down.grad is not None
        return down.grad.clone()

    master = down.detach().clone()
    with qat.quantized():
        assert torch.equal(down, int4_rtn(master))
        in_context = grad()
    assert torch.equal(down, master)  # the float weights are back ...
    float_grad = grad()
    qat.snap()
    assert torch.equal(in_context, grad())  # ... with the gradient taken on the grid
    assert not torch.allclose(in_context, float_grad)


def test_a_quantization_aware_student_converts_to_cpu_int4_exactly(trainable_tiny: Path, tmp_path: Path) -> None:
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = tmp_path / "tied-teacher"  # tied: the student's one table is both embedding and lm_head
    model = AutoModelForCausalLM.from_pretrained(str(trainable_tiny), dtype=torch.float32)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    model.save_pretrained(str(teacher))
    AutoTokenizer.from_pretrained(str(trainable_tiny)).save_pretrained(str(teacher))

    splits = generate_splits(16, 0, 0, seed=21)
    cfg = DistillConfig(keep_layers=1, max_steps=12, qat_steps=6, learning_rate=3e-3, batch_size=4, threads=1)
    result = distill(teacher, splits.train, tmp_path / "run", cfg)
    assert [h["quantized"] for h in result.history] == [False] * 6 + [True] * 6
    losses = [h["train_loss"] for h in result.history]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
    record = json.loads((result.student_dir / "slmops_training.json").read_text())
    assert record["quantization_aware"] == "int4 RTN symmetric block 32 (cpu-int4), the last 6 of 12 steps"

    student = AutoModelForCausalLM.from_pretrained(str(result.student_dir), dtype=torch.float32)
    state = {k: v.numpy() for k, v in student.state_dict().items()}
    for name in ("model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"):
        assert np.array_equal(int4_rtn(torch.from_numpy(state[name])).numpy(), state[name])  # saved on the grid

    built = convert(result.student_dir, get_profile("cpu-int4"), cache_dir=tmp_path / "cache", threads=1)
    graph = onnx.load(str(built.path / "model.onnx")).graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    checked = []
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weights = _dequantize_nbits(
            arrays[node.input[1]], arrays[node.input[2]], None, attrs["N"], attrs["K"], attrs["bits"], 32
        )
        if node.name == "/lm_head/MatMul_Q4":
            trained = state["model.embed_tokens.weight"]
        else:
            match = _NODE.match(node.name)
            assert match is not None, node.name
            prefix = f"model.layers.{match[1]}.{'self_attn' if match[2] == 'attn' else 'mlp'}"
            parts = ("q_proj", "k_proj", "v_proj") if match[3] == "qkv_proj" else (match[3],)
            trained = np.concatenate([state[f"{prefix}.{p}.weight"] for p in parts])
        assert np.array_equal(weights, trained), node.name
        checked.append(node.name)
    assert len(checked) == 6  # qkv, o, gate, up, down of the one layer and ...
    assert "/lm_head/MatMul_Q4" in checked  # ... the lm_head, whose table the embedding reads:
    (gather,) = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert "lm_head.MatMul.weight_scales" in gather.input


def test_qat_steps_cannot_outnumber_the_steps(trainable_tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="qat_steps 5 is more than max_steps 4"):
        DistillConfig(max_steps=4, qat_steps=5)
    write_jsonl(generate_splits(2, 0, 0, seed=25).train, tmp_path / "inputs.jsonl")
    args = ["distill", "-t", str(trainable_tiny), "-d", str(tmp_path / "inputs.jsonl"), "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--max-steps", "4", "--qat-steps", "9"])
    assert result.exit_code == 1
    assert "qat_steps 9 is more than max_steps 4" in result.output
    assert not (tmp_path / "out").exists()  # refused before the teacher ran

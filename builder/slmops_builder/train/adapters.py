"""Several LoRA adapters on one base, for onnxruntime-genai's multi-LoRA runtime.

1. `build_adapter_base`: convert the base with onnxruntime-genai's model builder and a LoRA
   layout (`adapter_path`: a zero adapter with the wanted rank and target modules), then turn every
   LoRA weight into a graph input whose default (an initializer of the same name) is zero. The base
   without an active adapter is therefore the plain base. For int4 the LoRA MatMuls are excluded
   from quantization and `accuracy_level=1` (fp32 activations) is used: with int8 activations
   (level 4) or int4 LoRA weights the adapter's effect is lost.
2. `dequantize_base`: an HF copy of the base whose linear weights are the int4 base's dequantized
   weights. Adapters trained on it learn against exactly the weights the device multiplies with,
   which is what keeps their accuracy on the int4 base (an adapter trained on fp32 weights mostly
   does not survive next to int4 weights).
3. `export_adapter`: a PEFT adapter folder -> `.onnx_adapter` (onnxruntime.AdapterFormat) whose
   parameter names and shapes are checked against the base's LoRA inputs; B carries the scaling.
4. `package_adapter_base` / `package_adapter`: signed packages; an adapter package has kind
   "adapter" and one Adapter entry bound to its base package id.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmops_builder.profiles import Profile, get_profile

if TYPE_CHECKING:
    import numpy as np

    from slmops_builder.packaging import WrittenPackage
    from slmops_builder.train.runs import LoraSettings

__all__ = [
    "ADAPTER_LAYOUT_FILE",
    "AdapterBase",
    "AdapterExportError",
    "build_adapter_base",
    "dequantize_base",
    "export_adapter",
    "package_adapter",
    "package_adapter_base",
]

ADAPTER_LAYOUT_FILE = "slmops_lora.json"
MODEL_FILE = "model.onnx"
LORA_RANK_DIM = "lora_rank"
_LORA_INIT = re.compile(r"^model\.layers\.(\d+)\.(attn|mlp)\.(\w+)\.lora_([AB])\.MatMul\.weight$")
_PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_BASE_MATMUL = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul(_Q\d)?$")


class AdapterExportError(ValueError):
    """An adapter that does not fit its base (names, ranks, shapes)."""


@dataclass(frozen=True)
class AdapterBase:
    """An adapter-ready base: `path` loads in onnxruntime-genai; `inputs` maps each LoRA input to
    its shape (None for the rank)."""

    path: Path
    precision: str
    lora: dict[str, Any]
    inputs: dict[str, list[int | None]]

    @classmethod
    def load(cls, path: Path) -> AdapterBase:
        layout = Path(path) / ADAPTER_LAYOUT_FILE
        if not layout.is_file():
            raise AdapterExportError(f"{path} is not an adapter-ready base (no {ADAPTER_LAYOUT_FILE})")
        data = json.loads(layout.read_text())
        return cls(Path(path), data["precision"], data["lora"], {k: list(v) for k, v in data["inputs"].items()})


def _lora_target_nodes(num_layers: int, targets: tuple[str, ...]) -> list[str]:
    names = []
    for i in range(num_layers):
        for t in targets:
            block = "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "attn"
            names += [f"/model/layers.{i}/{block}/{t}/lora_A/MatMul", f"/model/layers.{i}/{block}/{t}/lora_B/MatMul"]
    return names


def _template_adapter(base_model: Path, lora: LoraSettings, root: Path) -> Path:
    """A PEFT adapter with the LoRA layout (values are irrelevant: the base zeroes them)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = json.dumps(lora.model_dump(mode="json"), sort_keys=True) + (base_model / "config.json").read_text()
    out = root / f"lora-layout-{hashlib.sha256(spec.encode()).hexdigest()[:16]}"
    if (out / "adapter_config.json").is_file():
        return out
    config = AutoConfig.from_pretrained(str(base_model))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=list(lora.target_modules), bias="none"
        ),
    )
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp))
    tmp.rename(out)
    return out


def adapter_profile(precision: str, lora: LoraSettings, num_layers: int, layout_dir: Path) -> Profile:
    """The model builder options of an adapter-ready base (a Profile, so `convert` caches it)."""
    base = get_profile(f"cpu-{precision}")
    options = {"adapter_path": str(layout_dir.resolve())}
    if precision in ("int4", "int8"):
        options |= {
            "block_size": base.quantization.get("block_size", "32"),
            "accuracy_level": "1",
            "nodes_to_exclude": ",".join(_lora_target_nodes(num_layers, lora.target_modules)),
        }
    return Profile(f"{base.name}-lora", "cpu", precision, options, base.min_memory_bytes, base.description)


def build_adapter_base(
    base_model: Path,
    lora: LoraSettings,
    out: Path,
    *,
    precision: str = "int4",
    name: str = "model",
    cache_dir: Path | None = None,
    threads: int | None = None,
) -> AdapterBase:
    """Convert `base_model` into an adapter-ready onnxruntime-genai folder at `out` (must not exist)."""
    import onnx
    from transformers import AutoConfig

    from slmops_builder.convert import convert, stage
    from slmops_builder.steps import default_cache_dir

    base_model, out = Path(base_model), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists")
    if precision not in ("int4", "fp32"):
        raise ValueError(f"adapter-ready bases are built in int4 or fp32, not {precision}")
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    layout = _template_adapter(base_model, lora, cache_root / "lora-layouts")
    num_layers = int(AutoConfig.from_pretrained(str(base_model)).num_hidden_layers)
    profile = adapter_profile(precision, lora, num_layers, layout)
    converted = convert(base_model, profile, cache_dir=cache_root, threads=threads)
    stage(converted.path, out, name=name)
    model_path = out / MODEL_FILE
    model = _load_onnx_copy(model_path)
    inputs = _lora_weights_to_inputs(model)
    if not inputs:
        raise AdapterExportError("the model builder wrote no LoRA weights; is the architecture supported?")
    for f in out.glob(MODEL_FILE + "*"):
        f.unlink()  # hard links into the cache: never write through them
    onnx.save_model(
        model, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True, location=MODEL_FILE + ".data"
    )
    layout_record: dict[str, Any] = {
        "precision": precision,
        "lora": {**lora.model_dump(mode="json"), "target_modules": list(lora.target_modules)},
        "inputs": inputs,
        "model_builder_options": {k: v for k, v in profile.quantization.items() if k != "adapter_path"},
    }
    (out / ADAPTER_LAYOUT_FILE).write_text(json.dumps(layout_record, indent=2) + "\n")
    return AdapterBase(out, precision, layout_record["lora"], inputs)


def _load_onnx_copy(model_path: Path) -> Any:
    """Load a model whose files are hard links into the step cache (onnx refuses those) via a copy."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory(prefix="slmops-onnx-") as tmp:
        for f in model_path.parent.glob(model_path.name + "*"):
            shutil.copyfile(f, Path(tmp) / f.name)
        return onnx.load(str(Path(tmp) / model_path.name), load_external_data=True)


def _lora_weights_to_inputs(model: Any) -> dict[str, list[int | None]]:
    """Make each LoRA initializer a graph input (symbolic rank) with a zero default."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    inputs: dict[str, list[int | None]] = {}
    graph = model.graph
    for init in graph.initializer:
        m = _LORA_INIT.match(init.name)
        if m is None:
            continue
        if init.data_type != TensorProto.FLOAT:
            raise AdapterExportError(f"LoRA weight {init.name} is not float32 (was it quantized?)")
        dims = list(init.dims)
        shape: list[int | None] = [dims[0], None] if m.group(4) == "A" else [None, dims[1]]
        zero = numpy_helper.from_array(np.zeros(dims, dtype=np.float32), init.name)
        init.CopyFrom(zero)
        sym: list[int | str] = [d if d is not None else LORA_RANK_DIM for d in shape]
        graph.input.append(helper.make_tensor_value_info(init.name, TensorProto.FLOAT, sym))
        inputs[init.name] = shape
    return inputs


def _dequantize_nbits(
    b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, n: int, k: int, bits: int, block: int
) -> np.ndarray:
    """MatMulNBits weights -> float [N, K]."""
    import numpy as np

    n_blocks = (k + block - 1) // block
    raw = b.reshape(n, -1).astype(np.uint8)
    q: np.ndarray
    if bits == 4:
        q = np.empty((n, raw.shape[1] * 2), dtype=np.uint8)
        q[:, 0::2] = raw & 0x0F
        q[:, 1::2] = raw >> 4
    elif bits == 8:
        q = raw
    else:
        raise AdapterExportError(f"MatMulNBits with {bits} bits is not supported")
    q = q[:, : n_blocks * block].reshape(n, n_blocks, block).astype(np.float32)
    s = scales.reshape(n, n_blocks).astype(np.float32)
    if zero_points is None:
        zp = np.full((n, n_blocks), float(2 ** (bits - 1)), dtype=np.float32)
    elif zero_points.dtype == np.uint8:
        zraw = zero_points.reshape(n, -1)
        if bits == 4:
            z = np.empty((n, zraw.shape[1] * 2), dtype=np.uint8)
            z[:, 0::2] = zraw & 0x0F
            z[:, 1::2] = zraw >> 4
        else:
            z = zraw
        zp = z[:, :n_blocks].astype(np.float32)
    else:
        zp = zero_points.reshape(n, n_blocks).astype(np.float32)
    w = (q - zp[:, :, None]) * s[:, :, None]
    return w.reshape(n, n_blocks * block)[:, :k]


def _shares_table(model_proto: Any, matmul: Any) -> bool:
    """Whether the graph's embedding lookup reads `matmul`'s quantized table (a tied int4 model)."""
    return any(n.op_type == "GatherBlockQuantized" and matmul.input[2] in n.input for n in model_proto.graph.node)


def dequantize_base(base_model: Path, quantized: Path, out: Path) -> Path:
    """Write an HF copy of `base_model` whose decoder Linear weights and lm_head are the dequantized
    MatMulNBits weights of the onnxruntime-genai model in `quantized`. A tied model whose int4 graph
    looks its embeddings up in lm_head's table (GatherBlockQuantized) stays tied, so the embeddings
    are that table too; one whose graph keeps float embeddings gets its lm_head untied."""
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_model, out = Path(base_model), Path(out)
    model_proto = _load_onnx_copy(Path(quantized) / MODEL_FILE)
    inits = {i.name: i for i in model_proto.graph.initializer}
    hf = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    modules = dict(hf.named_modules())
    replaced = 0
    for node in model_proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        m = _BASE_MATMUL.match(node.name)
        if m is not None:
            block = "self_attn" if m.group(2) == "attn" else "mlp"
            target = f"model.layers.{m.group(1)}.{block}.{m.group(3)}"
        elif node.name.startswith("/lm_head/"):
            target = "lm_head"
        else:
            continue
        linear = modules.get(target)
        if linear is None:
            raise AdapterExportError(f"{node.name}: no module {target} in {base_model}")
        arrays = [numpy_helper.to_array(inits[name]) if name in inits else None for name in node.input]
        zp = arrays[3] if len(arrays) > 3 and node.input[3] else None
        assert arrays[1] is not None and arrays[2] is not None
        w = _dequantize_nbits(
            arrays[1], arrays[2], zp, int(attrs["N"]), int(attrs["K"]), int(attrs["bits"]), int(attrs["block_size"])
        )
        if tuple(w.shape) != tuple(linear.weight.shape):
            raise AdapterExportError(f"{node.name}: shape {w.shape} != {tuple(linear.weight.shape)} of {target}")
        with torch.no_grad():
            if target == "lm_head" and hf.config.tie_word_embeddings and not _shares_table(model_proto, node):
                hf.lm_head.weight = torch.nn.Parameter(torch.from_numpy(w).clone())
                hf.config.tie_word_embeddings = False
            else:
                linear.weight.copy_(torch.from_numpy(w))  # tied: the embeddings' table as well
        replaced += 1
    if replaced == 0:
        raise AdapterExportError(f"no int4/int8 MatMulNBits weights in {quantized}")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(base_model)).save_pretrained(str(tmp))
    (tmp / "slmops_dequantized.json").write_text(
        json.dumps(
            {
                "base_model": str(base_model.resolve()),
                "quantized": str(Path(quantized).resolve()),
                "weights_replaced": replaced,
            },
            indent=2,
        )
        + "\n"
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def export_adapter(adapter_dir: Path, base: AdapterBase | Path, out_file: Path) -> dict[str, Any]:
    """PEFT adapter folder -> `.onnx_adapter` for `base`. Returns {parameters, rank, bytes}."""
    import numpy as np
    import onnxruntime as ort
    from safetensors.numpy import load_file

    base = base if isinstance(base, AdapterBase) else AdapterBase.load(base)
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterExportError(f"{adapter_dir} is not a PEFT adapter (no adapter_config.json)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise AdapterExportError(f"{adapter_dir}: only LoRA adapters are supported, not {cfg.get('peft_type')}")
    if cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("bias", "none") != "none":
        raise AdapterExportError(f"{adapter_dir}: DoRA, per-module ranks and LoRA biases are not supported")
    r = int(cfg["r"])
    scaling = float(cfg["lora_alpha"]) / (r**0.5 if cfg.get("use_rslora") else r)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    params: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise AdapterExportError(f"{adapter_dir}: unexpected tensor {key} (only decoder attention/MLP LoRA)")
        block = "attn" if m.group(2) == "self_attn" else "mlp"
        name = f"model.layers.{m.group(1)}.{block}.{m.group(3)}.lora_{m.group(4)}.MatMul.weight"
        if name not in base.inputs:
            raise AdapterExportError(f"{adapter_dir}: {key} has no LoRA input in the base (targets differ)")
        arr = value.astype(np.float32).T if m.group(4) == "A" else (value.astype(np.float32) * scaling).T
        want = [d if d is not None else r for d in base.inputs[name]]
        if list(arr.shape) != want:
            raise AdapterExportError(f"{adapter_dir}: {key} has shape {list(arr.shape)}, the base expects {want}")
        params[name] = np.ascontiguousarray(arr)
    for name, shape in base.inputs.items():
        if name not in params:  # a module the base adapts but this adapter does not: zero
            params[name] = np.zeros([d if d is not None else r for d in shape], dtype=np.float32)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".partial")
    fmt.export_adapter(str(tmp))
    tmp.replace(out_file)
    return {"parameters": len(params), "rank": r, "bytes": out_file.stat().st_size}


def package_adapter_base(
    base: AdapterBase, *, name: str, version: str, key: Path, out: Path, lineage: dict[str, Any] | None = None
) -> WrittenPackage:
    """Sign the adapter-ready base as a model package (profile cpu-<precision>, its real options)."""
    from slmops_builder.keys import load_private_key
    from slmops_builder.packaging import PackageSpec, write_package
    from slmops_protos.package.v1 import manifest_pb2

    record = json.loads((base.path / ADAPTER_LAYOUT_FILE).read_text())
    profile = get_profile(f"cpu-{base.precision}")
    pb = profile.to_pb()
    pb.quantization.clear()
    options = {k: v for k, v in record["model_builder_options"].items() if k != "nodes_to_exclude"}
    pb.quantization.update(options)
    pb.quantization["lora_targets"] = ",".join(base.lora["target_modules"])
    spec = PackageSpec(name=name, version=version, profile=pb, kind="model")
    spec.lineage = manifest_pb2.Lineage(**(lineage or {}))
    return write_package(base.path, spec, load_private_key(key), Path(out))


def package_adapter(
    adapter_file: Path,
    *,
    adapter_name: str,
    name: str,
    version: str,
    base_package: Path,
    key: Path,
    out: Path,
    lineage: dict[str, Any] | None = None,
) -> WrittenPackage:
    """A signed adapter package: the `.onnx_adapter` file, bound to `base_package` by its id."""
    import tempfile

    from slmops_builder.keys import load_private_key
    from slmops_builder.packaging import PackageSpec, read_manifest, write_package
    from slmops_protos.package.v1 import manifest_pb2

    adapter_file = Path(adapter_file)
    if not adapter_file.is_file() or adapter_file.suffix != ".onnx_adapter":
        raise FileNotFoundError(f"no .onnx_adapter file at {adapter_file}")
    base_manifest, base_id = read_manifest(Path(base_package))
    if base_manifest.kind != "model":
        raise ValueError(f"{base_package} is a {base_manifest.kind!r} package, not a model")
    spec = PackageSpec(name=name, version=version, profile=base_manifest.profile, kind="adapter")
    spec.security_version = base_manifest.security_version  # an adapter package shares its base's
    spec.lineage = manifest_pb2.Lineage(**(lineage or {}))
    spec.lineage.parent_package_id = base_id
    spec.lineage.base_model = spec.lineage.base_model or base_manifest.lineage.base_model
    spec.adapters.append(manifest_pb2.Adapter(name=adapter_name, base_package_id=base_id, path=adapter_file.name))
    with tempfile.TemporaryDirectory(prefix="slmops-adapter-") as tmp:
        shutil.copyfile(adapter_file, Path(tmp) / adapter_file.name)
        return write_package(Path(tmp), spec, load_private_key(key), Path(out))

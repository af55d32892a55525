"""Training in the builder: the edge task and its data, LoRA fine-tuning, multi-LoRA export, distillation.

- `tasks`       the device-command task (generator, disjoint-template splits, scorer, user JSONL)
- `finetune`    LoRA/QLoRA with PEFT: checkpoints, exact resume, early stopping, loss curves
- `adapters`    adapter-ready onnxruntime-genai bases, int4-dequantized training copies, `.onnx_adapter`
                export, adapter packages bound to their base package
- `distill`     teacher answers (cached), layer-pruned student trained with KL + CE, evaluation
- `generation`  greedy generation in transformers and in onnxruntime-genai (per-request adapters)
- `cli`         `slmops builder task | finetune | distill | adapter-base | adapter-export`

Importing this package loads nothing heavy; torch, transformers and onnxruntime load inside functions.
"""

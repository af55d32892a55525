"""Training in the builder: the edge task and its data, LoRA fine-tuning, multi-LoRA export, distillation.

- `tasks`        the device-command task: generator with disjoint-template splits
- `actions`      the task's JSON action: canonical text, parsing, scoring
- `examples`     chat examples and the user's JSONL data
- `runs`         what the fine-tuning engines share: settings, progress, result, run layout, protocol
- `finetune`     `finetune()` and the training engines' registry (`TRAINING_ENGINES`)
- `peft_engine`  LoRA/QLoRA with PEFT on transformers' Trainer: checkpoints, exact resume, early stopping
- `trainer_setup` what the Trainer-based engines share: device and precision, the processes of a
                 distributed run (global batch split, main process), data stream, schedule, history
- `olive_engine` `olive finetune` in float32 into the same layout
- `hf_models`    Hugging Face models and tokenizers for training (QLoRA on CUDA)
- `batches`      examples as token batches, the seeded data order
- `run_output`   the end of a run: merged model, training record, loss curves, finetune.json
- `adapters`     adapter-ready onnxruntime-genai bases, int4-dequantized training copies, `.onnx_adapter`
                 export, adapter packages bound to their base package
- `distill`      teacher answers (cached), layer-pruned student trained with KL + CE, evaluation
- `distill_trainer` distillation's Trainer: the KD loss, the teacher's cached distributions, QAT steps
- `qat`, `vocab` the student's int4-aware training and trimmed vocabulary
- `generation`   greedy generation in transformers and in onnxruntime-genai (per-request adapters)
- `cli`          `slmops builder task | finetune | distill | adapter-base | adapter-export`
- `cli_task`     their options for the user's own task (system prompt, scorer, validity) and its package
- `scoring`      a task's system prompt, scorer (JSON, exact, contains, regex, token F1, ROUGE-L), validity rule
- `retention`    the trained model's package built and scored beside its teacher and float model

Importing this package loads nothing heavy; torch, transformers and onnxruntime load inside functions.
"""

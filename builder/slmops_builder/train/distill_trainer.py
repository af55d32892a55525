"""Distillation's stage 2 on transformers' `Trainer` (see `slmops_builder.train.distill`).

`DistillTrainer` is a `trainer_setup` StreamTrainer (the run's batches in `batches.epoch_order`
order, a pure function of seed and step, so a resumed run, under any process count, sees the batches
it would have seen; AdamW without weight decay, gradients clipped at norm 1, the schedule the caller
gives: for distillation, linear decay to a tenth without warm-up) whose `compute_loss` is the KD
loss: KL divergence between the temperature-softened teacher and student distributions at the answer
positions (scaled by T^2; the teacher's from `TeacherTargets`, computed once per example and kept in
memory within a budget) mixed with cross-entropy on the teacher's text, or that cross-entropy alone.
Both are sums over the answer tokens divided by the number of answer tokens of the whole global
batch, times the process count (DDP averages the gradients): the loss and its gradient are those of
one process with the global batch, whatever the number of processes. The last `qat_steps` steps run
their forward and backward passes on the int4 grid (`qat.QuantAwareWeights`, in `training_step`).
Each training step's log carries the step's ce, kl and whether it ran quantized (`HISTORY_EXTRA`, the
history's extra columns).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from slmops_builder.train.batches import IGNORE_INDEX, collate
from slmops_builder.train.trainer_setup import trainer_classes

if TYPE_CHECKING:
    import torch

    from slmops_builder.train.qat import QuantAwareWeights

__all__ = ["HISTORY_EXTRA", "DistillTrainer", "KDCollator", "TeacherTargets"]

HISTORY_EXTRA = ("ce", "kl", "quantized")

StreamTrainer: Any = trainer_classes()[0]  # defined on first use (trainer_setup loads transformers lazily)


class TeacherTargets:
    """The teacher's log-probabilities (at temperature T, over the student's tokens) at the answer
    positions of each example: computed for the examples of a batch, kept when they fit the budget."""

    def __init__(
        self, model: Any, teacher_ids: list[int] | None, temperature: float, budget_bytes: int, pad_id: int
    ) -> None:
        import torch

        self.model = model
        device = next(model.parameters()).device
        head = model.get_output_embeddings()
        rows = head.weight.shape[0]
        self.index = torch.tensor(teacher_ids if teacher_ids is not None else range(rows), dtype=torch.long)
        self.index = self.index.to(device)
        self.weight = head.weight.detach()[self.index]
        bias = getattr(head, "bias", None)
        self.bias = bias.detach()[self.index] if bias is not None else None
        self.temperature = temperature
        self.budget = budget_bytes
        self.pad_id = pad_id
        self.used = 0
        self.cache: dict[int, Any] = {}

    def __call__(self, indices: Sequence[int], encoded: Sequence[tuple[list[int], list[int]]]) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        device = self.index.device
        missing = [i for i in dict.fromkeys(indices) if i not in self.cache]
        fresh: dict[int, Any] = {}
        if missing:
            batch = {k: v.to(device) for k, v in collate([encoded[i] for i in missing], self.pad_id).items()}
            with torch.no_grad():
                hidden = self.model.base_model(
                    input_ids=self.index[batch["input_ids"]], attention_mask=batch["attention_mask"]
                ).last_hidden_state
                mask = batch["labels"][:, 1:] != IGNORE_INDEX  # positions that predict an answer token
                for row, i in enumerate(missing):
                    logits = F.linear(hidden[row, :-1][mask[row]], self.weight, self.bias).float()
                    fresh[i] = F.log_softmax(logits / self.temperature, -1)
            for i, value in fresh.items():
                size = value.numel() * value.element_size()
                if self.used + size <= self.budget:
                    self.cache[i] = value
                    self.used += size
        return torch.cat([self.cache[i] if i in self.cache else fresh[i] for i in indices])


class KDCollator:
    """Encoded examples ({"index", "input_ids", "labels"}) as a padded batch with their indices."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = collate([(f["input_ids"], f["labels"]) for f in features], self.pad_id)
        return {**batch, "index": torch.tensor([f["index"] for f in features], dtype=torch.long)}


class DistillTrainer(StreamTrainer):
    """A StreamTrainer (of `KDCollator` batches) with the KD loss and the QAT steps."""

    def __init__(
        self,
        *args: Any,
        encoded: Sequence[tuple[list[int], list[int]]],
        targets: TeacherTargets | None,
        temperature: float,
        kd_weight: float,
        qat: QuantAwareWeights | None,
        qat_from: int,
        **kwargs: Any,
    ) -> None:
        import torch

        super().__init__(*args, **kwargs)
        self.encoded = encoded
        self.targets = targets
        self.temperature = temperature
        self.kd_weight = kd_weight
        self.qat = qat
        self.qat_from = qat_from
        self._sums = torch.zeros(3, dtype=torch.float64, device=self.args.device)  # ce, kl, tokens since the last log

    def collator(self, pad_id: int) -> Callable[[list[Any]], dict[str, Any]]:
        return KDCollator(pad_id)

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        on_grid = self.qat is not None and self.state.global_step + 1 >= self.qat_from
        with self.qat.quantized() if on_grid and self.qat is not None else nullcontext():
            return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        import torch
        import torch.nn.functional as F

        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        mask = labels[:, 1:] != IGNORE_INDEX  # positions that predict an answer token
        s_logits = outputs.logits[:, :-1][mask].float()
        ce = F.cross_entropy(s_logits, labels[:, 1:][mask], reduction="sum")
        kl = torch.zeros((), device=ce.device)
        if self.targets is not None:
            t = self.temperature
            t_logp = self.targets(inputs["index"].tolist(), self.encoded)
            kl = F.kl_div(F.log_softmax(s_logits / t, -1), t_logp, log_target=True, reduction="sum") * t * t
        tokens = mask.sum().to(torch.float64)
        local = torch.stack([ce.detach().double(), kl.detach().double(), tokens])
        self._sums += local
        total = self._sum_across(tokens.clone())
        mixed = ce if self.targets is None else self.kd_weight * kl + (1 - self.kd_weight) * ce
        loss = mixed / total.float() * self.args.world_size
        return (loss, outputs) if return_outputs else loss

    def _sum_across(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the training processes."""
        return self.accelerator.reduce(tensor, reduction="sum") if self.args.world_size > 1 else tensor

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training step's log: the run's own figures join it
            sums = self._sum_across(self._sums.clone())
            self._sums.zero_()
            ce, kl, tokens = sums.tolist()
            logs["ce"] = ce / tokens
            logs["kl"] = kl / tokens if self.targets is not None else None  # type: ignore[assignment]
            logs["quantized"] = self.qat is not None and self.state.global_step >= self.qat_from
        super().log(logs, start_time)

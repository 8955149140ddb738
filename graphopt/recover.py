"""`graphopt.recover`: win back the accuracy pruning cost by distillation from the original.

The pruned model (the student) is fine-tuned to reproduce the original model's (the
teacher's) outputs on unlabeled inputs: KL divergence between their softened output
distributions (logits), or mean squared error for other outputs. Labels are only used to
measure top-1 accuracy before and after, when `eval_data` has them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

from graphopt.progress import ProgressBar

LOSSES = ("kl", "mse")


@dataclass
class Recovery:
    """What `recover` did. Accuracies are top-1 on `eval_data` (None without it); agreement
    is the fraction of eval inputs where the student's top-1 equals the teacher's."""

    steps: int
    seconds: float
    loss_first: float
    loss_last: float
    teacher_top1: float | None = None
    top1_before: float | None = None
    top1_after: float | None = None
    agreement_before: float | None = None
    agreement_after: float | None = None

    def __str__(self) -> str:
        lines = [
            f"graphopt recover: {self.steps} steps in {self.seconds:.1f}s, distillation loss "
            f"{self.loss_first:.4g} -> {self.loss_last:.4g}"
        ]
        if self.top1_before is not None:
            lines.append(
                f"  top-1: teacher {self.teacher_top1:.2%}, pruned {self.top1_before:.2%} -> "
                f"recovered {self.top1_after:.2%}"
            )
        if self.agreement_before is not None:
            lines.append(
                f"  agreement with the teacher: {self.agreement_before:.2%} -> "
                f"{self.agreement_after:.2%}"
            )
        return "\n".join(lines)


def recover(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    data: Iterable[Any],
    *,
    steps: int = 200,
    lr: float = 1e-3,
    temperature: float = 2.0,
    loss: str = "kl",
    eval_data: tuple[Any, torch.Tensor] | None = None,
    progress: bool = True,
) -> Recovery:
    """Fine-tune a pruned `student` in place to match `teacher`'s outputs.

    Args:
        student: the pruned model, e.g. from `graphopt.prune` (it needs trainable parameters;
            the compiled result of `graphopt.optimize` has none).
        teacher: the original model; run in eval mode without gradients.
        data: re-iterable batches (a list, a DataLoader) of model inputs: a tensor or a tuple
            of positional inputs per batch (no labels: for a loader of (x, y) pairs pass
            `[x for x, _ in loader]`). Cycled until `steps` steps are done.
        steps: optimizer steps (Adam, cosine-decayed learning rate).
        lr: the initial learning rate.
        temperature: softens both distributions for loss="kl" (the loss is scaled by T^2).
        loss: "kl" (outputs are logits over the last dim) or "mse".
        eval_data: (inputs, labels) to measure top-1 accuracy and agreement with the teacher
            before and after.
        progress: draw a progress bar on stderr.

    Returns:
        A `Recovery` with the loss and the accuracies before and after.
    """
    if loss not in LOSSES:
        raise ValueError(f"graphopt.recover: loss={loss!r}; accepted values: {list(LOSSES)}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"graphopt.recover: steps must be an integer >= 1, got {steps!r}")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"graphopt.recover: the student ({type(student).__name__}) has no trainable "
            "parameters; fine-tune the PyTorch module from graphopt.prune(...), then compile "
            "or optimize it"
        )
    teacher_was_training, student_was_training = teacher.training, student.training
    teacher.eval()
    result = Recovery(steps, 0.0, math.nan, math.nan)
    if eval_data is not None:
        result.teacher_top1, _ = _evaluate(teacher, eval_data, teacher)
        result.top1_before, result.agreement_before = _evaluate(student, eval_data, teacher)
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    bar = ProgressBar("graphopt recover", steps, enabled=progress)
    start = time.perf_counter()
    student.train()
    try:
        for step, batch in zip(range(steps), _cycle(data)):
            inputs = batch if isinstance(batch, tuple | list) else (batch,)
            with torch.no_grad():
                target = teacher(*inputs)
            value = _distillation_loss(student(*inputs), target, loss, temperature)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            schedule.step()
            if step == 0:
                result.loss_first = value.item()
            result.loss_last = value.item()
            bar.update(step + 1, f"loss {result.loss_last:.4g}")
    finally:
        student.train(student_was_training)
        teacher.train(teacher_was_training)
        bar.close()
    result.seconds = time.perf_counter() - start
    if eval_data is not None:
        result.top1_after, result.agreement_after = _evaluate(student, eval_data, teacher)
    return result


def _cycle(data: Iterable[Any]) -> Iterator[Any]:
    while True:
        count = 0
        for batch in data:
            count += 1
            yield batch
        if count == 0:
            raise ValueError(
                "graphopt.recover: data gave no batches (a one-shot iterator is used up after "
                "one pass: pass a list or a DataLoader)"
            )


def _distillation_loss(
    student_out: Any, teacher_out: Any, loss: str, temperature: float
) -> torch.Tensor:
    got = [t for t in pytree.tree_leaves(student_out) if isinstance(t, torch.Tensor)]
    want = [t for t in pytree.tree_leaves(teacher_out) if isinstance(t, torch.Tensor)]
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        raise ValueError(
            "graphopt.recover: student and teacher outputs differ in structure or shape: "
            f"{[tuple(g.shape) for g in got]} vs {[tuple(w.shape) for w in want]}"
        )
    total = torch.zeros(())
    for g, w in zip(got, want):
        if not g.is_floating_point():
            continue
        if loss == "mse":
            total = total + F.mse_loss(g, w)
        else:
            t = temperature
            log_p = F.log_softmax(g.flatten(0, -2) / t, dim=-1)
            log_q = F.log_softmax(w.flatten(0, -2) / t, dim=-1)
            total = total + F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * t * t
    return total


@torch.no_grad()
def _evaluate(
    model: torch.nn.Module, eval_data: tuple[Any, torch.Tensor], teacher: torch.nn.Module
) -> tuple[float, float]:
    """(top-1 accuracy against the labels, top-1 agreement with the teacher) in batches."""
    inputs, labels = eval_data
    inputs = inputs if isinstance(inputs, tuple | list) else (inputs,)
    correct = agree = 0
    for i in range(0, len(labels), 256):
        chunk = [x[i : i + 256] for x in inputs]
        guess = _logits(model(*chunk)).argmax(-1)
        correct += int((guess == labels[i : i + 256]).sum())
        agree += int((guess == _logits(teacher(*chunk)).argmax(-1)).sum())
    return correct / len(labels), agree / len(labels)


def _logits(out: Any) -> torch.Tensor:
    return next(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))

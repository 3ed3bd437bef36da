"""The reference engine of topx.fm's SGD learner: the FactorizationMachine nn.Module, autograd and
torch.optim.Adagrad with sparse gradients.

``train_fm(..., engine="autograd")`` trains with it. It is slower than the fused engine and kept as
the check that the fused engine's closed-form gradients and row-wise Adagrad take the same steps
(tests/unit/test_fm_fused.py) and as the baseline of benchmarks/train.py.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from topx.config import HyperParameters
from topx.fm import (
    FactorizationMachine,
    TrainingData,
    _DeviceData,
    _mean_loss,
    _progress_bar,
    _with_negatives,
)
from topx.params import FMParams


class AutogradTrainer:
    """The reference engine: the nn.Module, autograd and torch.optim.Adagrad with sparse gradients."""

    def __init__(self, model: FactorizationMachine, data: TrainingData, hp: HyperParameters,
                 generator: torch.Generator, dev: torch.device, sample_negatives: bool) -> None:
        self.model, self.hp, self.generator, self.dev = model, hp, generator, dev
        self.sample_negatives = sample_negatives
        self.optimizer = torch.optim.Adagrad(
            [
                {"params": [model.bias], "lr": hp.bias_lr},
                {"params": [model.linear.weight], "lr": hp.linear_lr},
                {"params": [model.factors.weight], "lr": hp.factors_lr},
            ],
            initial_accumulator_value=1e-8,
        )
        self.dd = _DeviceData(data, dev)
        self.users = torch.as_tensor(data.user_rows, device=dev)
        self.items = torch.as_tensor(data.item_rows, device=dev)
        self.labels = torch.as_tensor(data.label, dtype=torch.float32, device=dev)
        self.weights = None if data.weight is None else torch.as_tensor(data.weight, dtype=torch.float32, device=dev)

    def run_epoch(self, epoch: int, show: bool) -> float:
        self.model.train()
        return _run_epoch(self.model, self.optimizer, self.dd, self.users, self.items, self.labels, self.weights,
                          self.hp, self.generator, self.dev, show, epoch, self.sample_negatives)

    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], classifier: bool) -> float:
        return _evaluate_loss(self.model, batches, classifier)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return copy.deepcopy(self.model.state_dict())

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def to_params(self, predictor_type: str) -> FMParams:
        return self.model.to_params(predictor_type)


def _run_epoch(
    model: FactorizationMachine,
    optimizer: torch.optim.Optimizer,
    dd: _DeviceData,
    users: torch.Tensor,
    items: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None,
    hp: HyperParameters,
    generator: torch.Generator,
    dev: torch.device,
    show: bool,
    epoch: int,
    sample_negatives: bool,
) -> float:
    classifier = hp.predictor_type == "binary_classifier"
    n = users.shape[0]
    order = torch.randperm(n, generator=generator).to(dev)
    batch = hp.mini_batch_size
    total, count = 0.0, 0
    steps = range(0, n, batch)
    bar = _progress_bar(len(steps), epoch, hp, show)
    for start in steps:
        sel = order[start:start + batch]
        u, i, y = users[sel], items[sel], labels[sel]
        w = None if weights is None else weights[sel]
        if sample_negatives:
            u, i, y, w = _with_negatives(u, i, y, w, dd.n_items, hp.negative_samples, generator, dev)
        index, value = dd.rows(u, i)
        pred, sq = model(index, value)
        if classifier:
            per_sample = nn.functional.binary_cross_entropy_with_logits(pred, y, reduction="none")
        else:
            per_sample = (pred - y).pow(2)
        data_loss = per_sample.mean() if w is None else (per_sample * w).sum() / w.sum()
        reg = (hp.linear_wd * sq[0] + hp.factors_wd * sq[1]).mean() + hp.bias_wd * model.bias.pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        (data_loss + reg).backward()
        optimizer.step()
        total += float(data_loss.detach()) * len(sel)
        count += len(sel)
        bar.update()
    bar.close()
    return total / max(count, 1)


def _evaluate_loss(
    model: FactorizationMachine, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], classifier: bool
) -> float:
    model.eval()
    return _mean_loss(lambda index, value: model(index, value)[0], batches, classifier)

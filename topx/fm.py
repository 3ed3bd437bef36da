"""Factorization machine in PyTorch: one implementation for CPU and CUDA.

    y(x) = b + sum_j w_j x_j + sum_{j<l} <v_j, v_l> x_j x_l

computed in the O(k * nnz) form  0.5 * sum_f [(sum_j v_jf x_j)^2 - sum_j v_jf^2 x_j^2].

Training data are (user, item) pairs. Each sample's x is ``user_x[u] + item_x[i]``; both design
tables are kept as padded (index, value) rows on the training device, so a mini-batch is two
gathers and never a host-to-device copy. Embeddings use sparse gradients, so an optimiser step
touches only the rows present in the batch.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from topx.config import HyperParameters
from topx.errors import ConfigError, InputDataError
from topx.params import FMParams


@dataclass(frozen=True)
class PaddedRows:
    """A CSR matrix as fixed-width rows. index: (n_rows, width) int64; value: (n_rows, width) float32.

    Padding entries have value 0 (and index 0), so they add nothing to the FM.
    """

    index: np.ndarray
    value: np.ndarray

    @classmethod
    def from_csr(cls, matrix: sp.spmatrix) -> PaddedRows:
        csr = sp.csr_matrix(matrix)
        n_rows = csr.shape[0]
        lengths = np.diff(csr.indptr)
        width = max(int(lengths.max()) if n_rows else 0, 1)
        index = np.zeros((n_rows, width), dtype=np.int64)
        value = np.zeros((n_rows, width), dtype=np.float32)
        rows = np.repeat(np.arange(n_rows), lengths)
        cols = np.arange(csr.nnz) - np.repeat(csr.indptr[:-1], lengths)
        index[rows, cols] = csr.indices
        value[rows, cols] = csr.data
        return cls(index, value)


class FactorizationMachine(nn.Module):
    """Parameters: bias (1,), linear (N, 1), factors (N, k). Forward takes padded rows."""

    def __init__(self, n_features: int, hp: HyperParameters, generator: torch.Generator) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))
        self.linear = nn.Embedding(n_features, 1, sparse=True)
        self.factors = nn.Embedding(n_features, hp.num_factors, sparse=True)
        with torch.no_grad():
            _init_normal(self.bias, hp.bias_init_sigma, generator)
            _init_normal(self.linear.weight, hp.linear_init_sigma, generator)
            _init_normal(self.factors.weight, hp.factors_init_sigma, generator)

    def forward(self, index: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """index, value: (B, width). Returns (y (B,), squared norm of the touched parameters (B,))."""
        v = self.factors(index)                      # (B, width, k)
        vx = v * value.unsqueeze(-1)
        s = vx.sum(dim=1)                            # (B, k)
        pair = 0.5 * (s.pow(2).sum(dim=1) - vx.pow(2).sum(dim=(1, 2)))
        w = self.linear(index).squeeze(-1)           # (B, width)
        linear = (w * value).sum(dim=1)
        present = (value != 0).to(v.dtype)
        sq_factors = (v.pow(2).sum(dim=-1) * present).sum(dim=1)
        sq_linear = (w.pow(2) * present).sum(dim=1)
        return self.bias + linear + pair, torch.stack([sq_linear, sq_factors])

    def to_params(self, predictor_type: str) -> FMParams:
        return FMParams(
            bias=float(self.bias.detach().cpu()[0]),
            linear=self.linear.weight.detach().cpu().numpy()[:, 0].copy(),
            factors=self.factors.weight.detach().cpu().numpy().copy(),
            predictor_type=predictor_type,
        )


def _init_normal(tensor: torch.Tensor, sigma: float, generator: torch.Generator) -> None:
    """N(0, sigma^2) initialisation; sigma 0 means zeros (SageMaker's convention for init_sigma)."""
    if sigma > 0:
        tensor.normal_(0.0, sigma, generator=generator)
    else:
        tensor.zero_()


@dataclass(frozen=True)
class TrainingData:
    """Samples as (user row, item row) pairs over two design tables.

    user_rows, item_rows: (n,) int64 indices into user_table / item_table; label: (n,) float32;
    weight: (n,) float32 or None. For ``binary_classifier`` with ``sample_negatives`` the rows are
    the positives and negatives are sampled each epoch from the item table; without it the labels
    are taken as given (0 or 1), as in SageMaker's training data.
    """

    user_table: PaddedRows
    item_table: PaddedRows
    user_rows: np.ndarray
    item_rows: np.ndarray
    label: np.ndarray
    weight: np.ndarray | None = None
    sample_negatives: bool = True

    def __post_init__(self) -> None:
        n = len(self.label)
        if len(self.user_rows) != n or len(self.item_rows) != n:
            raise InputDataError("training data: user_rows, item_rows and label lengths differ")
        if n == 0:
            raise InputDataError("training data is empty: there is nothing to train on")


@dataclass
class TrainResult:
    params: FMParams
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    device: str = "cpu"


def pick_device(device: str | None = None) -> torch.device:
    """'auto' (or None) picks CUDA when present, else CPU; 'cpu' / 'cuda' / 'cuda:N' force it."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {device!r}: use auto, cpu or cuda") from exc
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but CUDA is not available on this machine")
    return chosen


class _DeviceData:
    """The training data resident on the device."""

    def __init__(self, data: TrainingData, device: torch.device) -> None:
        self.user_index = torch.as_tensor(data.user_table.index, device=device)
        self.user_value = torch.as_tensor(data.user_table.value, device=device)
        self.item_index = torch.as_tensor(data.item_table.index, device=device)
        self.item_value = torch.as_tensor(data.item_table.value, device=device)
        self.n_items = data.item_table.index.shape[0]

    def rows(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.cat([self.user_index[users], self.item_index[items]], dim=1)
        value = torch.cat([self.user_value[users], self.item_value[items]], dim=1)
        return index, value


def train_fm(
    data: TrainingData,
    n_features: int,
    hp: HyperParameters,
    *,
    device: str | None = None,
    validation: TrainingData | None = None,
    progress: bool | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train an FM. Early-stops on ``validation`` (or on a ``hp.validation_fraction`` split of
    ``data`` when none is given and the fraction is > 0) and returns the best epoch's parameters."""
    dev = pick_device(device)
    # Adagrad's sparse update builds COO tensors from indices it made itself; the notice about
    # skipped invariant checks is noise to a user.
    warnings.filterwarnings("ignore", message="Sparse invariant checks", category=UserWarning)
    torch.manual_seed(hp.seed)
    generator = torch.Generator(device="cpu").manual_seed(hp.seed)
    rng = np.random.default_rng(hp.seed)
    _check_indices(data, n_features)

    if validation is None and hp.validation_fraction > 0 and len(data.label) >= 20:
        data, validation = _split_validation(data, hp.validation_fraction, rng)

    model = FactorizationMachine(n_features, hp, generator).to(dev)
    classifier = hp.predictor_type == "binary_classifier"
    if not classifier:
        with torch.no_grad():
            model.bias.fill_(float(np.average(data.label, weights=data.weight)))
    optimizer = torch.optim.Adagrad(
        [
            {"params": [model.bias], "lr": hp.bias_lr},
            {"params": [model.linear.weight], "lr": hp.linear_lr},
            {"params": [model.factors.weight], "lr": hp.factors_lr},
        ],
        initial_accumulator_value=1e-8,
    )
    train_dev = _DeviceData(data, dev)
    users = torch.as_tensor(data.user_rows, device=dev)
    items = torch.as_tensor(data.item_rows, device=dev)
    labels = torch.as_tensor(data.label, dtype=torch.float32, device=dev)
    weights = None if data.weight is None else torch.as_tensor(data.weight, dtype=torch.float32, device=dev)
    val_batches = _validation_batches(validation, hp, rng, dev) if validation is not None else None

    show = sys.stderr.isatty() if progress is None else progress
    history: list[dict[str, float]] = []
    best_loss, best_epoch, best_state, stale = math.inf, 0, None, 0
    for epoch in range(1, hp.epochs + 1):
        model.train()
        train_loss = _run_epoch(model, optimizer, train_dev, users, items, labels, weights, hp, generator, dev, show,
                                epoch, classifier and data.sample_negatives)
        record = {"epoch": float(epoch), "train_loss": train_loss}
        if val_batches is not None:
            record["validation_loss"] = _evaluate_loss(model, val_batches, classifier)
            if record["validation_loss"] < best_loss - 1e-6:
                best_loss, best_epoch, stale = record["validation_loss"], epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if val_batches is not None and stale >= hp.early_stopping_patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = len(history)
    return TrainResult(model.to_params(hp.predictor_type), history, best_epoch, str(dev))


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
    from tqdm import tqdm

    classifier = hp.predictor_type == "binary_classifier"
    n = users.shape[0]
    order = torch.randperm(n, generator=generator).to(dev)
    batch = hp.mini_batch_size
    total, count = 0.0, 0
    steps = range(0, n, batch)
    bar = tqdm(steps, desc=f"epoch {epoch}/{hp.epochs}", unit="batch", leave=False, disable=not show, file=sys.stderr)
    for start in bar:
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
    bar.close()
    return total / max(count, 1)


def _with_negatives(
    u: torch.Tensor,
    i: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor | None,
    n_items: int,
    per_positive: int,
    generator: torch.Generator,
    dev: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Append ``per_positive`` uniformly sampled items per positive, labelled 0.

    A sampled item may happen to be a positive of that user; with catalogues much larger than a
    user's history this noise is small and unbiased across items.
    """
    neg_u = u.repeat_interleave(per_positive)
    neg_i = torch.randint(0, n_items, (neg_u.shape[0],), generator=generator).to(dev)
    neg_y = torch.zeros(neg_u.shape[0], device=dev)
    neg_w = None if w is None else torch.ones(neg_u.shape[0], device=dev)
    return (
        torch.cat([u, neg_u]),
        torch.cat([i, neg_i]),
        torch.cat([torch.ones_like(y), neg_y]),
        None if w is None else torch.cat([w, neg_w]),
    )


def _split_validation(
    data: TrainingData, fraction: float, rng: np.random.Generator
) -> tuple[TrainingData, TrainingData]:
    n = len(data.label)
    perm = rng.permutation(n)
    n_val = max(1, int(round(fraction * n)))
    val, train = perm[:n_val], perm[n_val:]

    def take(idx: np.ndarray) -> TrainingData:
        return TrainingData(
            data.user_table, data.item_table, data.user_rows[idx], data.item_rows[idx], data.label[idx],
            None if data.weight is None else data.weight[idx], data.sample_negatives,
        )

    return take(np.sort(train)), take(np.sort(val))


def _validation_batches(
    validation: TrainingData, hp: HyperParameters, rng: np.random.Generator, dev: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Fixed validation rows (with one fixed draw of negatives for a classifier), batched."""
    users, items, labels = validation.user_rows, validation.item_rows, validation.label.astype(np.float32)
    if hp.predictor_type == "binary_classifier" and validation.sample_negatives:
        n_items = validation.item_table.index.shape[0]
        neg_users = np.repeat(users, hp.negative_samples)
        neg_items = rng.integers(0, n_items, size=neg_users.shape[0])
        users = np.concatenate([users, neg_users])
        items = np.concatenate([items, neg_items])
        labels = np.concatenate([np.ones(len(validation.label), np.float32), np.zeros(len(neg_users), np.float32)])
    dd = _DeviceData(validation, dev)
    batches = []
    step = max(hp.mini_batch_size, 8192)
    for start in range(0, len(labels), step):
        u = torch.as_tensor(users[start:start + step], device=dev)
        i = torch.as_tensor(items[start:start + step], device=dev)
        index, value = dd.rows(u, i)
        batches.append((index, value, torch.as_tensor(labels[start:start + step], device=dev)))
    return batches


@torch.no_grad()
def _evaluate_loss(
    model: FactorizationMachine, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], classifier: bool
) -> float:
    model.eval()
    total, count = 0.0, 0
    for index, value, y in batches:
        pred, _ = model(index, value)
        if classifier:
            loss = nn.functional.binary_cross_entropy_with_logits(pred, y, reduction="sum")
        else:
            loss = (pred - y).pow(2).sum()
        total += float(loss)
        count += y.shape[0]
    mean = total / max(count, 1)
    return mean if classifier else math.sqrt(mean)


def _check_indices(data: TrainingData, n_features: int) -> None:
    for name, table in (("user", data.user_table), ("item", data.item_table)):
        if table.index.size and int(table.index.max()) >= n_features:
            raise InputDataError(f"{name} design rows reference feature {int(table.index.max())} >= {n_features}")
    if len(data.user_rows) and int(data.user_rows.max()) >= data.user_table.index.shape[0]:
        raise InputDataError("training pairs reference a user row outside the user table")
    if len(data.item_rows) and int(data.item_rows.max()) >= data.item_table.index.shape[0]:
        raise InputDataError("training pairs reference an item row outside the item table")
    if not np.all(np.isfinite(data.label)):
        raise InputDataError("training labels contain NaN or infinite values")


def predict(params: FMParams, x: sp.spmatrix) -> np.ndarray:
    """Brute-force FM scores of the rows of ``x`` (n, N) in float64: the reference the tests use."""
    csr = sp.csr_matrix(x, dtype=np.float64)
    v = params.factors.astype(np.float64)
    s = csr @ v
    s2 = csr.multiply(csr) @ (v * v)
    return params.bias + csr @ params.linear.astype(np.float64) + 0.5 * (s * s - s2).sum(axis=1)

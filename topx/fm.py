"""Factorization machine in PyTorch: one implementation for CPU and CUDA.

    y(x) = b + sum_j w_j x_j + sum_{j<l} <v_j, v_l> x_j x_l

computed in the O(k * nnz) form  0.5 * sum_f [(sum_j v_jf x_j)^2 - sum_j v_jf^2 x_j^2].

Training data are (user, item) pairs. Each sample's x is ``user_x[u] + item_x[i]``; both design
tables are kept as padded (index, value) rows on the training device, so a mini-batch is two
gathers and never a host-to-device copy.

Two engines train the same model with the same mini-batches, in the same order, from the same
initial weights, with the same Adagrad:

* ``fused`` (the default): the FM's gradient is closed form, dL/dv_j = g x_j (s - v_j x_j) and
  dL/dw_j = g x_j, so a step is two fused gather-and-sum kernels (``embedding_bag``) and a row-wise
  Adagrad update of only the rows the batch touches, with no autograd graph and no sparse COO
  tensors. The bookkeeping that depends only on the sample order (which rows a batch touches, and
  where each occurrence goes) is computed for many batches at once, before their steps run.
* ``autograd`` (topx.fm_reference): an ``nn.Module`` with sparse embeddings and ``torch.optim.Adagrad``. It is the
  reference the fused engine is tested against, and the baseline its benchmark reports.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
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


ENGINES = ("fused", "autograd")


def train_fm(
    data: TrainingData,
    n_features: int,
    hp: HyperParameters,
    *,
    device: str | None = None,
    validation: TrainingData | None = None,
    progress: bool | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    engine: str = "fused",
) -> TrainResult:
    """Train an FM. Early-stops on ``validation`` (or on a ``hp.validation_fraction`` split of
    ``data`` when none is given and the fraction is > 0) and returns the best epoch's parameters.

    ``engine``: ``"fused"`` (closed-form gradient, row-wise Adagrad; the default) or ``"autograd"``
    (the reference implementation, kept for tests and benchmarks). Both see the same batches."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown training engine {engine!r}: use one of {ENGINES}")
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
    if engine == "fused":
        trainer_class: type = _FusedTrainer
    else:
        from topx.fm_reference import AutogradTrainer as trainer_class
    trainer = trainer_class(model, data, hp, generator, dev, classifier and data.sample_negatives)
    val_batches = _validation_batches(validation, hp, rng, dev) if validation is not None else None

    show = sys.stderr.isatty() if progress is None else progress
    with intra_op_threads(1 if engine == "fused" and dev.type == "cpu" else None):
        history, best_epoch, best_state = _run_epochs(trainer, val_batches, hp, classifier, show, on_epoch)
    if best_state is not None:
        trainer.restore(best_state)
    else:
        best_epoch = len(history)
    return TrainResult(trainer.to_params(hp.predictor_type), history, best_epoch, str(dev))


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run with torch's CPU intra-op threads set to ``n`` (None: leave them), then restore them.

    The fused step is a few dozen operations on arrays of ~100k elements: splitting each across
    threads costs a fork/join per operation, and when another process holds a core the join waits
    for a time slice (measured: 1 thread 0.9 s per epoch, 2 threads 16-35 s on a busy 2-core
    machine). The second core plans the next batches instead.
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_epochs(
    trainer: _FusedTrainer,  # or topx.fm_reference.AutogradTrainer: the same methods
    val_batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None,
    hp: HyperParameters,
    classifier: bool,
    show: bool,
    on_epoch: Callable[[dict[str, float]], None] | None,
) -> tuple[list[dict[str, float]], int, object]:
    """Train epoch by epoch with early stopping. Returns the history, the best epoch and its state."""
    history: list[dict[str, float]] = []
    best_loss, best_epoch, best_state, stale = math.inf, 0, None, 0
    for epoch in range(1, hp.epochs + 1):
        train_loss = trainer.run_epoch(epoch, show)
        record = {"epoch": float(epoch), "train_loss": train_loss}
        if val_batches is not None:
            record["validation_loss"] = trainer.evaluate(val_batches, classifier)
            if record["validation_loss"] < best_loss - 1e-6:
                best_loss, best_epoch, stale = record["validation_loss"], epoch, 0
                best_state = trainer.snapshot()
            else:
                stale += 1
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if val_batches is not None and stale >= hp.early_stopping_patience:
            break
    return history, best_epoch, best_state


def _progress_bar(total: int, epoch: int, hp: HyperParameters, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}/{hp.epochs}", unit="batch", leave=False, disable=not show,
                file=sys.stderr)



# Occurrences (sample x design slot) whose bookkeeping is planned in one go: enough batches to
# amortise the per-operation overhead, few enough that the plan stays a few tens of MB.
_PLAN_OCCURRENCES = 1 << 16
_PREPARED_AHEAD = 2  # runs of batches planned ahead of the one training
_ADAGRAD_EPS = 1e-10  # torch.optim.Adagrad's default eps, so both engines take the same steps


def _take_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """table[rows] as a new tensor (numpy's take is several times faster than torch's on CPU)."""
    if table.device.type == "cpu":
        return torch.from_numpy(table.numpy().take(rows.numpy(), axis=0))
    return table.index_select(0, rows)


def _put_rows(table: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """table[rows] = values, rows distinct (numpy's fancy assignment is faster for this on CPU)."""
    if table.device.type == "cpu":
        table.numpy()[rows.numpy()] = values.numpy()
    else:
        table.index_copy_(0, rows, values)


def _bag_sum(weight: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """out[r] = sum over t in bag r of scale[t] * weight[index[t]]; bag r starts at offsets[r].

    weight: (n, d) contiguous; index, scale: (n_occ,); offsets: (n_bags,). The aten kernel behind
    F.embedding_bag(mode="sum"), called directly: this is the hot loop, and the wrapper's checks
    cost as much as the sum itself at these sizes.
    """
    return torch.embedding_bag(weight, index, offsets, False, 0, False, scale, False, None)[0]


class _NumpyOps:
    """The few array functions the planner needs, on host arrays. On CPU the planner runs on numpy:
    its sort, integer arithmetic and scatter are several times faster than torch's for these sizes."""

    def __init__(self) -> None:
        self.float32, self.int64, self.bool = np.float32, np.int64, np.bool_

    def wrap(self, tensor: torch.Tensor) -> np.ndarray:
        return tensor.numpy()

    def unwrap(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array))

    def arange(self, n: int) -> np.ndarray:
        return np.arange(n, dtype=np.int64)

    def full(self, n: int, fill: int | bool, dtype) -> np.ndarray:
        return np.full(n, fill, dtype=dtype)

    def sort(self, keys: np.ndarray) -> np.ndarray:
        return np.sort(keys)

    def cumsum(self, a: np.ndarray) -> np.ndarray:
        return np.cumsum(a)

    def flatnonzero(self, a: np.ndarray) -> np.ndarray:
        return np.flatnonzero(a)

    def bincount(self, a: np.ndarray, weights: np.ndarray | None, minlength: int) -> np.ndarray:
        return np.bincount(a, weights=weights, minlength=minlength)

    def cast(self, a: np.ndarray, dtype) -> np.ndarray:
        return a.astype(dtype)


class _TorchOps:
    """The same functions on a torch device (CUDA): the plan is made where the data live."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.float32, self.int64, self.bool = torch.float32, torch.int64, torch.bool

    def wrap(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def unwrap(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.contiguous()

    def arange(self, n: int) -> torch.Tensor:
        return torch.arange(n, device=self.device)

    def full(self, n: int, fill: int | bool, dtype) -> torch.Tensor:
        return torch.full((n,), fill, dtype=dtype, device=self.device)

    def sort(self, keys: torch.Tensor) -> torch.Tensor:
        return torch.sort(keys).values

    def cumsum(self, a: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(a, 0)

    def flatnonzero(self, a: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(a).squeeze(1)

    def bincount(self, a: torch.Tensor, weights: torch.Tensor | None, minlength: int) -> torch.Tensor:
        return torch.bincount(a, weights=weights, minlength=minlength)

    def cast(self, a: torch.Tensor, dtype) -> torch.Tensor:
        return a.to(dtype)


@dataclass(frozen=True)
class _Plan:
    """Everything about a run of equal-size batches that does not depend on the parameters.

    For each batch the distinct feature rows it touches are its *segments*. Per batch c (of ``batch``
    samples, ``width`` slots each): segments ``seg_start[c]:seg_start[c+1]``, occurrences
    ``c*batch*width:(c+1)*batch*width`` in the arrays sorted by segment.

    rows: (n_seg,) feature row of each segment; heads: (n_seg,) where each segment's occurrences
    begin within its batch's sorted slice; present: (n_seg,) how many of them have a non-zero value;
    slot_segment: (n_occ,) the segment of each (sample, slot), in sample order;
    sample: (n_occ,) the sample (within its batch) of each occurrence, sorted by segment;
    value, value_sq: (n_occ,) its x_j and x_j^2 in the same order.
    """

    batch: int
    seg_start: list[int]
    rows: torch.Tensor
    heads: torch.Tensor
    present: torch.Tensor
    slot_segment: torch.Tensor
    sample: torch.Tensor
    value: torch.Tensor
    value_sq: torch.Tensor


def _plan_batches(index: torch.Tensor, value: torch.Tensor, n_batches: int, n_features: int) -> _Plan:
    """Plan ``n_batches`` consecutive batches whose design rows are ``index``/``value`` (n_batches*b, width).

    One sort of the keys (batch, feature, position in batch) groups every batch's occurrences by
    feature; since each batch has the same number of occurrences, row c of the sorted keys viewed as
    (n_batches, b*width) is batch c.
    """
    ops = _NumpyOps() if index.device.type == "cpu" else _TorchOps(index.device)
    n_rows, width = index.shape
    b = n_rows // n_batches
    per_batch = b * width
    n_occ = n_rows * width
    pos_bits = max(1, (per_batch - 1).bit_length())
    feat_bits = max(1, (n_features - 1).bit_length())
    batch_ids = ops.arange(n_batches)
    keys = ((batch_ids << (feat_bits + pos_bits))[:, None]
            | (ops.wrap(index).reshape(n_batches, per_batch) << pos_bits)
            | ops.arange(per_batch)[None, :])
    keys = ops.sort(keys.reshape(-1)).reshape(n_batches, per_batch)
    local = keys & ((1 << pos_bits) - 1)  # position within the batch, in sample order
    group = (keys >> pos_bits).reshape(-1)  # (batch, feature)
    new = ops.full(n_occ, True, ops.bool)
    new[1:] = group[1:] != group[:-1]
    segment = ops.cumsum(new) - 1
    heads = ops.flatnonzero(new)
    seg_group = group[heads]
    seg_batch = seg_group >> feat_bits
    seg_start = ops.full(n_batches + 1, 0, ops.int64)
    seg_start[1:] = ops.cumsum(ops.bincount(seg_batch, None, n_batches))
    origin = (local + (batch_ids * per_batch)[:, None]).reshape(-1)
    slot_segment = ops.full(n_occ, 0, ops.int64)
    slot_segment[origin] = (segment.reshape(n_batches, per_batch) - seg_start[:-1][:, None]).reshape(-1)
    occ_value = ops.wrap(value).reshape(-1)[origin]
    present = ops.cast(ops.bincount(segment, ops.cast(occ_value != 0, ops.float32), len(heads)), ops.float32)
    return _Plan(
        batch=b,
        seg_start=seg_start.tolist(),
        rows=ops.unwrap(seg_group & ((1 << feat_bits) - 1)),
        heads=ops.unwrap(heads - seg_batch * per_batch),
        present=ops.unwrap(present),
        slot_segment=ops.unwrap(slot_segment),
        sample=ops.unwrap(local.reshape(-1) // width),
        value=ops.unwrap(occ_value),
        value_sq=ops.unwrap(occ_value * occ_value),
    )


@dataclass(frozen=True)
class _Prepared:
    """A run of batches ready to train: its plan, and per (sample, slot) x_j, per sample y and weight."""

    plan: _Plan
    n_batches: int
    size: int  # positives per batch
    value: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor | None


class _FusedTrainer:
    """The fused engine. The parameters live in one (N, k+1) table, columns 0..k-1 the factors v_j
    and column k the linear weight w_j, with Adagrad's accumulators in a table of the same shape."""

    def __init__(self, model: FactorizationMachine, data: TrainingData, hp: HyperParameters,
                 generator: torch.Generator, dev: torch.device, sample_negatives: bool) -> None:
        self.hp, self.generator, self.dev = hp, generator, dev
        self.sample_negatives = sample_negatives
        self.classifier = hp.predictor_type == "binary_classifier"
        self.k = k = hp.num_factors
        with torch.no_grad():
            self.table = torch.cat([model.factors.weight, model.linear.weight], dim=1).contiguous()
            self.bias = model.bias.detach().clone()
        self.state = torch.full_like(self.table, 1e-8)
        self.bias_state = torch.full_like(self.bias, 1e-8)
        self.lr = torch.tensor([hp.factors_lr] * k + [hp.linear_lr], device=dev)
        self.wd = torch.tensor([hp.factors_wd] * k + [hp.linear_wd], device=dev)
        self.dd = _DeviceData(data, dev)
        self.users = torch.as_tensor(data.user_rows, device=dev)
        self.items = torch.as_tensor(data.item_rows, device=dev)
        self.labels = torch.as_tensor(data.label, dtype=torch.float32, device=dev)
        self.weights = None if data.weight is None else torch.as_tensor(data.weight, dtype=torch.float32, device=dev)
        self.width = self.dd.user_index.shape[1] + self.dd.item_index.shape[1]

    @torch.no_grad()
    def run_epoch(self, epoch: int, show: bool) -> float:
        """One pass in the reference engine's batch order. A helper thread gathers and plans the next
        runs of batches while this one trains on the current run (numpy and torch release the GIL)."""
        n = self.users.shape[0]
        order = torch.randperm(n, generator=self.generator).to(self.dev)
        batch = self.hp.mini_batch_size
        per_sample = self.width * (1 + self.hp.negative_samples if self.sample_negatives else 1)
        chunk = max(1, _PLAN_OCCURRENCES // (batch * per_sample))
        full = n // batch
        runs = [(first, min(first + chunk, full), batch) for first in range(0, full, chunk)]
        if n % batch:
            runs.append((full, full + 1, n % batch))
        total = torch.zeros((), dtype=torch.float64, device=self.dev)
        bar = _progress_bar(-(-n // batch), epoch, self.hp, show)
        # One worker, so runs are prepared (and negatives drawn) strictly in order.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending: deque[Future[_Prepared]] = deque()
            for first, last, size in runs:
                sel = order[first * batch:first * batch + (last - first) * size]
                pending.append(pool.submit(self._prepare, sel, last - first, size))
                if len(pending) > _PREPARED_AHEAD:
                    total += self._train(pending.popleft().result(), bar)
            while pending:
                total += self._train(pending.popleft().result(), bar)
        bar.close()
        return float(total) / n

    def _prepare(self, sel: torch.Tensor, n_batches: int, size: int) -> _Prepared:
        """Gather the design rows of ``n_batches`` consecutive batches of ``size`` positives each
        (sel: their samples), add the negatives, and plan them."""
        u, i, y = _take_rows(self.users, sel), _take_rows(self.items, sel), _take_rows(self.labels, sel)
        w = None if self.weights is None else _take_rows(self.weights, sel)
        if self.sample_negatives:
            u, i, y, w = self._with_negatives(u, i, w, n_batches, size)
        dd = self.dd
        index = torch.cat([_take_rows(dd.user_index, u), _take_rows(dd.item_index, i)], dim=1)
        value = torch.cat([_take_rows(dd.user_value, u), _take_rows(dd.item_value, i)], dim=1)
        plan = _plan_batches(index, value, n_batches, self.table.shape[0])
        return _Prepared(plan, n_batches, size, value.view(-1), y, w)

    def _train(self, run: _Prepared, bar) -> torch.Tensor:
        """The steps of a prepared run of batches. Returns its data loss times its positives."""
        plan = run.plan
        b, per_batch = plan.batch, plan.batch * self.width
        slots = torch.arange(0, per_batch, self.width, device=self.dev)
        losses = []
        for c in range(run.n_batches):
            segs = slice(plan.seg_start[c], plan.seg_start[c + 1])
            occs = slice(c * per_batch, (c + 1) * per_batch)
            samples = slice(c * b, (c + 1) * b)
            losses.append(self._step(
                plan.rows[segs], plan.heads[segs], plan.present[segs], plan.slot_segment[occs], slots,
                plan.sample[occs], plan.value[occs], plan.value_sq[occs], run.value[occs], run.y[samples],
                None if run.w is None else run.w[samples],
            ))
            bar.update()
        return torch.stack(losses).sum() * run.size

    def _with_negatives(
        self, u: torch.Tensor, i: torch.Tensor, w: torch.Tensor | None, n_batches: int, size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Each batch's positives followed by its sampled negatives, as the reference engine lays them
        out, drawing from the generator in the same order (one draw here equals the batches' draws)."""
        neg = self.hp.negative_samples
        shape = (n_batches, size)
        neg_u = u.view(shape).repeat_interleave(neg, dim=1)
        neg_i = torch.randint(0, self.dd.n_items, (n_batches * size * neg,), generator=self.generator)
        neg_i = neg_i.to(self.dev).view(n_batches, size * neg)
        ones, zeros = torch.ones(shape, device=self.dev), torch.zeros(neg_u.shape, device=self.dev)
        return (
            torch.cat([u.view(shape), neg_u], 1).reshape(-1),
            torch.cat([i.view(shape), neg_i], 1).reshape(-1),
            torch.cat([ones, zeros], 1).reshape(-1),
            None if w is None else torch.cat([w.view(shape), torch.ones_like(zeros)], 1).reshape(-1),
        )

    def _step(
        self,
        rows: torch.Tensor,
        heads: torch.Tensor,
        present: torch.Tensor,
        slot_segment: torch.Tensor,
        slots: torch.Tensor,
        sample: torch.Tensor,
        occ_value: torch.Tensor,
        occ_value_sq: torch.Tensor,
        value: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor | None,
    ) -> torch.Tensor:
        """One mini-batch: forward, closed-form gradient, Adagrad on the touched rows. Returns the data loss.

        rows (U,): the feature rows the batch touches; slot_segment, value (b*width,): each
        (sample, slot)'s position in ``rows`` and x_j, samples in order, ``width`` slots each
        (slots: (b,) where each sample starts); sample, occ_value, occ_value_sq (b*width,): the same
        occurrences grouped by row, row r's starting at heads[r]; present (U,): non-zero x_j per row.
        """
        k, b, hp = self.k, y.shape[0], self.hp
        params = _take_rows(self.table, rows)  # (U, k+1)
        acc = _take_rows(self.state, rows)
        s = _bag_sum(params, slot_segment, slots, value)  # (b, k+1): sum_j x_j v_j | sum_j x_j w_j
        sq_norm = torch.linalg.vector_norm(params[:, :k], dim=1, keepdim=True).square_()
        q = _bag_sum(sq_norm, slot_segment, slots, value * value).squeeze(1)  # sum_j x_j^2 |v_j|^2
        pred = torch.linalg.vector_norm(s[:, :k], dim=1).square_().sub_(q).mul_(0.5).add_(s[:, k]).add_(self.bias)
        if self.classifier:
            per_sample = F.binary_cross_entropy_with_logits(pred, y, reduction="none")
            d_pred = torch.sigmoid(pred).sub_(y)
        else:
            d_pred = pred.sub_(y)
            per_sample = d_pred * d_pred
            d_pred = d_pred.mul_(2.0)
        if w is None:
            loss, g = per_sample.mean(), d_pred.div_(b)
        else:
            w_sum = w.sum()
            loss, g = (per_sample * w).sum() / w_sum, d_pred.mul_(w).div_(w_sum)
        # dL/dv_j = sum g x_j s - (sum g x_j^2) v_j and dL/dw_j = sum g x_j: one gather-and-sum over
        # the batch's occurrences grouped by row, with the linear column's "s" set to 1.
        s.select(1, k).fill_(1.0)
        grad = _bag_sum(s, sample, heads, g.index_select(0, sample).mul_(occ_value))  # (U, k+1)
        c = _bag_sum(g.unsqueeze(1), sample, heads, occ_value_sq)  # (U, 1): sum g x_j^2
        # The wd term is the gradient of wd * mean over the batch of sum_{j present} |v_j|^2.
        if hp.factors_wd == hp.linear_wd:
            coef = present.unsqueeze(1).mul(2.0 * hp.factors_wd / b).sub_(c)
            grad.addcmul_(params, coef)
            grad[:, k].addcmul_(c.squeeze(1), params[:, k])  # the c term is the factors' only
        else:
            grad[:, :k].addcmul_(c, params[:, :k], value=-1.0)
            grad.addcmul_(params, present.unsqueeze(1) * (2.0 / b) * self.wd)
        acc.addcmul_(grad, grad)
        denom = acc.sqrt().add_(_ADAGRAD_EPS)
        if hp.factors_lr == hp.linear_lr:
            params.addcdiv_(grad, denom, value=-hp.factors_lr)
        else:
            params.addcdiv_(grad.mul_(self.lr), denom, value=-1.0)
        _put_rows(self.table, rows, params)
        _put_rows(self.state, rows, acc)
        g_bias = g.sum().unsqueeze(0)
        if hp.bias_wd > 0:
            g_bias = g_bias + 2.0 * hp.bias_wd * self.bias
        self.bias_state.addcmul_(g_bias, g_bias)
        self.bias.addcdiv_(g_bias, self.bias_state.sqrt().add_(_ADAGRAD_EPS), value=-hp.bias_lr)
        return loss

    @torch.no_grad()
    def predict(self, index: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """FM scores of padded rows (B, width) with the current parameters."""
        k = self.k
        s = F.embedding_bag(index, self.table, per_sample_weights=value, mode="sum")
        sq_norm = self.table[:, :k].pow(2).sum(1, keepdim=True)
        q = F.embedding_bag(index, sq_norm, per_sample_weights=value * value, mode="sum").squeeze(1)
        return self.bias + s[:, k] + 0.5 * (s[:, :k].pow(2).sum(1) - q)

    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], classifier: bool) -> float:
        return _mean_loss(self.predict, batches, classifier)

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.table.clone(), self.bias.clone()

    def restore(self, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.table.copy_(state[0])
        self.bias.copy_(state[1])

    def to_params(self, predictor_type: str) -> FMParams:
        table = self.table.cpu().numpy()
        return FMParams(
            bias=float(self.bias.cpu()[0]),
            linear=table[:, self.k].copy(),
            factors=np.ascontiguousarray(table[:, :self.k]),
            predictor_type=predictor_type,
        )



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
def _mean_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    classifier: bool,
) -> float:
    """Mean log loss (classifier) or RMSE (regressor) of ``predict`` over the batches."""
    total, count = 0.0, 0
    for index, value, y in batches:
        pred = predict(index, value)
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

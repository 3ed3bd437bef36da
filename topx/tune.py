"""A small search of the ranking learner's settings on a validation carve of the user's own data.

What it does, so that a user can judge what it found:

1. From the rows it may train on (the evaluation hold-out is never seen), each user's
   ``VALIDATION_FRACTION`` of rows (seeded) becomes a validation carve; the rest is the tuning set.
2. Every point of ``TUNE_GRID`` (the weight decay of the factors ``factors_wd`` and of the linear
   terms ``linear_wd``, and the weight of the unobserved pairs ``unobserved_weight``: the settings the
   icd learner's quality depends on most) is trained on the tuning set with the other settings as
   given, and scored by recall@x on the carve, every unseen item ranked, by the same evaluation code as
   the hold-out.
3. The best point wins; a tie keeps the given settings. The report says what each point scored, what
   the given settings scored, and the gain.

It costs one training per grid point (eighteen by default) on 80 % of the rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from topx.config import HyperParameters
from topx.errors import ConfigError

VALIDATION_FRACTION = 0.2
TUNE_GRID: dict[str, tuple[float, ...]] = {
    "factors_wd": (0.1, 0.3, 1.0),
    "unobserved_weight": (1.0, 3.0, 10.0),
    "linear_wd": (1.0, 10.0),
}


@dataclass(frozen=True)
class TuneResult:
    """chosen: the settings that won (a subset of HyperParameters fields); trials: one dict per grid point
    with its settings and validation recall; given/best: the validation recall of the given and chosen."""

    chosen: dict[str, float]
    given: float
    best: float
    trials: list[dict[str, Any]]
    metric: str

    @property
    def gain(self) -> float:
        """Relative gain of the chosen settings over the given ones on the carve (0 when none)."""
        return self.best / self.given - 1.0 if self.given > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "validation_fraction": VALIDATION_FRACTION, "chosen": self.chosen,
                "given_score": self.given, "best_score": self.best, "gain": self.gain, "trials": self.trials}


def tune_hyperparameters(ds: Any, train_mask: np.ndarray, hp: HyperParameters, run: Any,
                         grid: dict[str, tuple[float, ...]] | None = None) -> TuneResult:
    """Search ``grid`` (default ``TUNE_GRID``) on a carve of the rows ``train_mask`` selects.

    ds: a topx.dataset.Dataset; run: its RunOptions (top_x, device, search method)."""
    from topx.dataset import with_history
    from topx.steps import evaluate_model, fit
    from topx.vectors import export_vectors

    if hp.learner != "icd":
        raise ConfigError("tuning searches the icd learner's settings: it needs the ranking objective and "
                          "learner icd")
    grid = TUNE_GRID if grid is None else grid
    rows = np.flatnonzero(train_mask)
    sub = ds.rows(rows)
    carve = sub.holdout(VALIDATION_FRACTION, hp.seed + 3)
    if not carve.any():
        raise ConfigError("too little data to tune: no user has enough interactions for a validation carve")
    sub = with_history(sub, ~carve, hp)
    quiet = replace(run, progress=False)
    metric = f"recall_at_{run.top_x}"

    def score(values: dict[str, float]) -> float:
        candidate = replace(hp, **values)
        params = fit(sub, ~carve, candidate, quiet).params
        metrics = evaluate_model(params, export_vectors(params, sub.feature_index), sub, carve, quiet,
                                 candidate.seed, candidate.learner)
        return float(metrics.get(metric, 0.0))

    given_values = {name: getattr(hp, name) for name in grid}
    given = score(given_values)
    trials, best, chosen = [], given, given_values
    for point in _points(grid):
        value = given if point == given_values else score(point)
        trials.append({**point, metric: value})
        if value > best:
            best, chosen = value, point
    return TuneResult(chosen, given, best, trials, metric)


def _points(grid: dict[str, tuple[float, ...]]) -> list[dict[str, float]]:
    points: list[dict[str, float]] = [{}]
    for name, values in grid.items():
        points = [{**point, name: value} for point in points for value in values]
    return points

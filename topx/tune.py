"""A small search of the ranking learner's settings on a validation carve of the user's own data.

What it does, so that a user can judge what it found:

1. From the rows it may train on (the evaluation hold-out is never seen), each user's
   ``VALIDATION_FRACTION`` of rows, a seeded draw whether or not the data have a time column, becomes a
   validation carve; the rest is the tuning set.
2. Every point of ``TUNE_GRID`` (the weight decay of the factors ``factors_wd`` and of the linear
   terms ``linear_wd``, and the weight of the unobserved pairs ``unobserved_weight``: the settings the
   icd learner's quality depends on most) is trained on the tuning set with the other settings as
   given, and scored by recall@x on the carve, every unseen item ranked, by the same evaluation code as
   the hold-out.
3. The best point wins if it beats the given settings by ``MIN_GAIN`` (3 %) on the carve; otherwise the
   given settings stay. One training's seed moves a carve's recall by a few per cent, so a smaller gain
   is as likely noise as a better setting: by nested validation on seven carves (docs/PERFORMANCE.md,
   "What `topx tune` gains"), picks the carve favoured by under 1 % lost up to 2 % on unseen rows, and
   picks it favoured by 6 % or more gained 1-15 %. The report says what each point scored, what the
   given settings scored, the best point and its gain, and whether it was taken.

It costs one training per grid point (eighteen by default) on 80 % of the rows.

``topx run`` and the deployed Train job search by default ("auto") when the data is of a size where it
pays and is cheap: ``AUTO_MIN_ROWS`` to ``AUTO_MAX_ROWS`` training rows (below, a carve holds about one row
per user; above, the trainings cost more than the gain is worth), for the ranking learner, and not when the
user set one of the grid's settings (their choice stands). It searches ``AUTO_GRID``, the unobserved
weight and the linear terms' decay: in the nested validation every pick at these sizes kept the factors'
decay, so the six points find what the eighteen did at a third of the cost. ``--tune`` searches the whole
grid whatever the size, ``--no-tune`` never.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from topx.config import HyperParameters
from topx.errors import ConfigError

VALIDATION_FRACTION = 0.2
MIN_GAIN = 0.03  # the relative gain on the carve that the best point needs to replace the given settings
AUTO_MIN_ROWS = 5_000
AUTO_MAX_ROWS = 2_000_000
TUNE_MODES = ("auto", "on", "off")
TUNE_GRID: dict[str, tuple[float, ...]] = {
    "factors_wd": (0.1, 0.3, 1.0),
    "unobserved_weight": (1.0, 3.0, 10.0),
    "linear_wd": (1.0, 10.0),
}
AUTO_GRID: dict[str, tuple[float, ...]] = {
    "unobserved_weight": TUNE_GRID["unobserved_weight"],
    "linear_wd": TUNE_GRID["linear_wd"],
}


class NothingToTune(ConfigError):
    """The rows leave no validation carve to judge settings by."""


@dataclass(frozen=True)
class TuneResult:
    """chosen: the settings to train with (a subset of HyperParameters fields: the best point's, or the
    given ones when it gained less than MIN_GAIN); best_point: the best-scoring point; trials: one dict
    per grid point with its settings and validation recall; given/best: the validation recall of the
    given settings and of the best point."""

    chosen: dict[str, float]
    given: float
    best: float
    trials: list[dict[str, Any]]
    metric: str
    best_point: dict[str, float]
    changed: bool  # whether the best point replaced the given settings

    @property
    def gain(self) -> float:
        """Relative gain of the best point over the given settings on the carve (0 when none)."""
        return self.best / self.given - 1.0 if self.given > 0 else 0.0

    def summary(self) -> str:
        """One line: what was chosen and why."""
        point = ", ".join(f"{k}={v:g}" for k, v in self.best_point.items())
        ended = outcome(self.as_dict())
        if ended == "changed":
            return f"chose {point}: {self.metric} {self.best:.4f} on the carve ({self.gain:+.1%})."
        if ended == "given_best":
            return f"kept the given settings: they scored best on the carve ({self.metric} {self.given:.4f})."
        return (f"kept the given settings ({self.metric} {self.given:.4f} on the carve): the best point, {point}, "
                f"gained {self.gain:+.1%}, under the {MIN_GAIN:.0%} a change needs.")

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "validation_fraction": VALIDATION_FRACTION, "min_gain": MIN_GAIN,
                "chosen": self.chosen, "changed": self.changed, "best_point": self.best_point,
                "given_score": self.given, "best_score": self.best, "gain": self.gain, "trials": self.trials}


def tune_hyperparameters(ds: Any, train_mask: np.ndarray, hp: HyperParameters, run: Any,
                         grid: dict[str, tuple[float, ...]] | None = None) -> TuneResult:
    """Search ``grid`` (default ``TUNE_GRID``) on a carve of the rows ``train_mask`` selects.

    ds: a topx.dataset.Dataset; run: its RunOptions (top_x, device, search method)."""
    from topx import evaluate as ev
    from topx.dataset import with_history
    from topx.steps import evaluate_model, fit
    from topx.vectors import export_vectors

    if hp.learner != "icd":
        raise ConfigError("tuning searches the icd learner's settings: it needs the ranking objective and "
                          "learner icd")
    grid = TUNE_GRID if grid is None else grid
    rows = np.flatnonzero(train_mask)
    sub = ds.rows(rows)
    # A seeded random carve even where the data have a time column: on MovieLens a carve of each user's
    # latest rows favoured points (more weight on the unobserved pairs) that scored no better on later rows
    # and worse on a random hold-out (docs/PERFORMANCE.md, "Time").
    carve = ev.holdout_split(sub.user_rows, VALIDATION_FRACTION, hp.seed + 3)
    if not carve.any():
        raise NothingToTune("too little data to tune: no user has enough interactions for a validation carve")
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
    trials = [{**point, metric: given if point == given_values else score(point)} for point in _points(grid)]
    return pick(given_values, given, trials, metric)


def outcome(report: dict[str, Any]) -> str:
    """How a search ended, from its report (``TuneResult.as_dict``, as metrics.json keeps it): "changed" (the
    best point replaced the given settings), "given_best" (the given settings scored best) or
    "under_min_gain" (a point scored better, by less than MIN_GAIN, and the given settings stayed)."""
    if report.get("changed"):
        return "changed"
    return "under_min_gain" if report.get("gain") else "given_best"


def pick(given_values: dict[str, float], given: float, trials: list[dict[str, Any]], metric: str) -> TuneResult:
    """The result of a search: the best trial (the first of equals) replaces the given settings when it
    beats their score by MIN_GAIN, relatively (or scores above a given score of 0)."""
    best, best_point = given, given_values
    for trial in trials:
        if trial[metric] > best:
            best, best_point = trial[metric], {k: v for k, v in trial.items() if k != metric}
    taken = (best / given - 1.0 >= MIN_GAIN) if given > 0 else best > 0
    return TuneResult(best_point if taken else given_values, given, best, trials, metric, best_point, taken)


def _points(grid: dict[str, tuple[float, ...]]) -> list[dict[str, float]]:
    points: list[dict[str, float]] = [{}]
    for name, values in grid.items():
        points = [{**point, name: value} for point in points for value in values]
    return points


def auto_tunes(n_train_rows: int, hp: HyperParameters) -> bool:
    """Whether "auto" searches: the ranking learner on AUTO_MIN_ROWS to AUTO_MAX_ROWS training rows."""
    return hp.learner == "icd" and AUTO_MIN_ROWS <= n_train_rows <= AUTO_MAX_ROWS


def tune_mode(requested: str, settings_given: Any) -> str:
    """The mode to run: ``requested`` (one of TUNE_MODES), except that "auto" is "off" when the user set
    one of the grid's settings (``settings_given``: the names of the settings they set)."""
    if requested not in TUNE_MODES:
        raise ConfigError(f"tune must be one of {', '.join(TUNE_MODES)}, got {requested!r}")
    if requested == "auto" and set(settings_given) & set(TUNE_GRID):
        return "off"
    return requested

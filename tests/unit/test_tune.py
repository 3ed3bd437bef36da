"""topx.tune's choice: the best point replaces the given settings only when it beats them by MIN_GAIN."""

from __future__ import annotations

import pytest

from topx.tune import MIN_GAIN, _points, pick

GIVEN = {"factors_wd": 0.3, "unobserved_weight": 5.0}
METRIC = "recall_at_10"


def trials(*scores: float) -> list[dict]:
    points = _points({"factors_wd": (0.1, 1.0), "unobserved_weight": (1.0, 10.0)})
    return [{**point, METRIC: score} for point, score in zip(points, scores, strict=True)]


def test_a_gain_under_min_gain_keeps_the_given_settings_and_says_so() -> None:
    result = pick(GIVEN, 0.20, trials(0.19, 0.204, 0.18, 0.20), METRIC)
    assert result.chosen == GIVEN and not result.changed
    assert result.best_point == {"factors_wd": 0.1, "unobserved_weight": 10.0} and result.best == 0.204
    assert result.gain == pytest.approx(0.02)
    assert "kept the given settings" in result.summary() and "+2.0%" in result.summary()
    assert result.as_dict()["changed"] is False and result.as_dict()["min_gain"] == MIN_GAIN


def test_a_gain_of_min_gain_or_more_takes_the_best_point() -> None:
    exactly = pick(GIVEN, 0.20, trials(0.19, 0.20 * (1 + MIN_GAIN), 0.18, 0.20), METRIC)
    assert exactly.changed and exactly.chosen == {"factors_wd": 0.1, "unobserved_weight": 10.0}
    larger = pick(GIVEN, 0.20, trials(0.19, 0.21, 0.23, 0.22), METRIC)
    assert larger.chosen == {"factors_wd": 1.0, "unobserved_weight": 1.0} and larger.best == 0.23
    assert larger.summary().startswith("chose factors_wd=1, unobserved_weight=1")


def test_equal_best_scores_take_the_first_and_a_given_score_of_zero_takes_any_gain() -> None:
    tied = pick(GIVEN, 0.10, trials(0.2, 0.2, 0.1, 0.2), METRIC)
    assert tied.chosen == {"factors_wd": 0.1, "unobserved_weight": 1.0}
    from_zero = pick(GIVEN, 0.0, trials(0.0, 0.01, 0.0, 0.0), METRIC)
    assert from_zero.changed and from_zero.chosen == {"factors_wd": 0.1, "unobserved_weight": 10.0}
    nothing = pick(GIVEN, 0.0, trials(0.0, 0.0, 0.0, 0.0), METRIC)
    assert nothing.chosen == GIVEN and not nothing.changed
    best_given = pick(GIVEN, 0.3, trials(0.2, 0.29, 0.1, 0.3), METRIC)
    assert best_given.best_point == GIVEN and best_given.summary() == (
        "kept the given settings: they scored best on the carve (recall_at_10 0.3000).")


def test_auto_searches_the_ranking_learner_at_its_sizes_and_not_when_a_grid_setting_was_given() -> None:
    from topx.config import default_hyperparameters
    from topx.errors import ConfigError
    from topx.tune import AUTO_MAX_ROWS, AUTO_MIN_ROWS, auto_tunes, tune_mode

    ranking, rating = default_hyperparameters("ranking"), default_hyperparameters("rating")
    assert auto_tunes(AUTO_MIN_ROWS, ranking) and auto_tunes(AUTO_MAX_ROWS, ranking)
    assert not auto_tunes(AUTO_MIN_ROWS - 1, ranking) and not auto_tunes(AUTO_MAX_ROWS + 1, ranking)
    assert not auto_tunes(AUTO_MIN_ROWS, rating)
    assert tune_mode("auto", ["epochs", "num_factors"]) == "auto"
    assert tune_mode("auto", ["unobserved_weight"]) == "off" and tune_mode("on", ["factors_wd"]) == "on"
    assert tune_mode("off", []) == "off"
    with pytest.raises(ConfigError, match="tune must be one of auto, on, off"):
        tune_mode("yes", [])


def test_auto_skips_data_that_leaves_no_carve_and_on_says_why(capsys) -> None:
    """Each user's one interaction leaves nothing to carve: the default search steps aside and training
    goes on with the given settings; asked for by name, the search refuses with the reason."""
    import numpy as np

    from topx.config import default_hyperparameters
    from topx.dataset import Dataset
    from topx.errors import ConfigError
    from topx.feature_index import FeatureIndex
    from topx.steps import Reporter, RunOptions, tuned_hyperparameters

    n = 6_000
    fi = FeatureIndex.one_hot([f"u{j}" for j in range(n)], [f"i{j}" for j in range(50)])
    ds = Dataset(fi, np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64) % 50, np.ones(n, np.float32),
                 implicit=True)
    hp = default_hyperparameters("ranking")
    assert tuned_hyperparameters(ds, hp, RunOptions(tune="auto", holdout=0.0), Reporter(True)) == (hp, None)
    assert "skipped: too little data to tune" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="too little data to tune"):
        tuned_hyperparameters(ds, hp, RunOptions(tune="on", holdout=0.0), Reporter(False))


def test_the_carve_is_a_seeded_draw_even_where_the_data_have_a_time_column() -> None:
    """A time column changes the evaluation hold-out (each user's latest rows), not the search's carve: with
    the weights the same (no recency boost), the search scores every point as it does without the column."""
    import numpy as np

    from topx.config import default_hyperparameters
    from topx.dataset import Dataset
    from topx.feature_index import FeatureIndex
    from topx.steps import RunOptions
    from topx.synth import generate
    from topx.tune import tune_hyperparameters

    frame = generate(150, 60, mean_interactions=12, implicit=True, seed=2).interactions
    users, user_rows = np.unique(frame["user_id"], return_inverse=True)
    items, item_rows = np.unique(frame["item_id"], return_inverse=True)
    fi = FeatureIndex.one_hot(list(users), list(items))
    untimed = Dataset(fi, user_rows.astype(np.int64), item_rows.astype(np.int64),
                      frame["plays"].to_numpy(np.float32), implicit=True)
    # Times that run against the seeded draw: a carve of each user's latest rows would differ from it.
    timed = Dataset(fi, untimed.user_rows, untimed.item_rows, untimed.rating, implicit=True,
                    time=np.arange(len(frame), 0, -1, dtype=np.int64))
    hp = default_hyperparameters("ranking", num_factors=8, epochs=3)
    grid = {"unobserved_weight": (1.0, 10.0)}
    mask = np.ones(len(frame), dtype=bool)
    run = RunOptions(holdout=0.0, progress=False)
    assert tune_hyperparameters(timed, mask, hp, run, grid).trials == tune_hyperparameters(untimed, mask, hp, run,
                                                                                          grid).trials

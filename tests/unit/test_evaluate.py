"""Evaluation metrics on cases small enough to work out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from topx import evaluate as ev
from topx.errors import ConfigError


def test_holdout_is_per_user_seeded_and_keeps_a_training_row():
    users = np.repeat(np.arange(4), [1, 2, 10, 5])
    mask = ev.holdout_split(users, 0.2, seed=1)
    assert not mask[users == 0].any()                  # a single interaction stays in training
    assert mask[users == 2].sum() == 2                 # 20 % of 10
    assert mask[users == 3].sum() == 1                 # 20 % of 5
    for u in range(4):
        assert (~mask[users == u]).any()
    np.testing.assert_array_equal(mask, ev.holdout_split(users, 0.2, seed=1))
    big = np.repeat(np.arange(200), 10)
    assert abs(ev.holdout_split(big, 0.2, seed=3).mean() - 0.2) < 1e-9
    assert not np.array_equal(ev.holdout_split(big, 0.2, seed=3), ev.holdout_split(big, 0.2, seed=4))
    with pytest.raises(ConfigError):
        ev.holdout_split(users, 1.0, seed=1)


def _held_by_rank(user_rows: np.ndarray, order: np.ndarray, fraction: float) -> np.ndarray:
    """The hold-out rule written the plain way: each user's rank in ``order`` against their count."""
    sorted_users = user_rows[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    counts = np.diff(np.r_[starts, len(user_rows)])
    n_held = np.minimum(np.floor(fraction * counts + 0.5).astype(np.int64), counts - 1)
    mask = np.zeros(len(user_rows), dtype=bool)
    mask[order] = np.arange(len(user_rows)) - np.repeat(starts, counts) < np.repeat(n_held, counts)
    return mask


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5, 0.9])
def test_the_hold_outs_mark_the_ranks_the_rule_says_whatever_the_counts(fraction):
    """Users of 1 to 40 rows, shuffled, some with none held: the splits agree with the rule written plainly."""
    rng = np.random.default_rng(11)
    users = rng.permutation(np.repeat(np.arange(300), rng.integers(1, 41, 300)))
    keys = np.random.default_rng(5).random(len(users))
    np.testing.assert_array_equal(ev.holdout_split(users, fraction, seed=5),
                                  _held_by_rank(users, np.lexsort((keys, users)), fraction))
    times = rng.integers(0, 50, len(users))
    latest_first = np.lexsort((-np.arange(len(users)), -times, users))
    np.testing.assert_array_equal(ev.temporal_split(users, times, fraction),
                                  _held_by_rank(users, latest_first, fraction))


def test_rmse_auc_and_log_loss():
    assert ev.rmse(np.array([1.0, 3.0]), np.array([2.0, 2.0])) == pytest.approx(1.0)
    assert ev.auc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0])) == pytest.approx(1.0)
    assert ev.auc(np.array([0.1, 0.9, 0.5, 0.5]), np.array([1, 0, 1, 0])) == pytest.approx(0.125)  # one tie among four pairs
    assert ev.log_loss(np.array([0.0]), np.array([1.0])) == pytest.approx(np.log(2))
    assert ev.log_loss(np.array([1000.0]), np.array([0.0])) == pytest.approx(1000.0)


def test_ranking_metrics_by_hand():
    # User 0: relevant {1, 3}; recommended [1, 2, 3] -> hits at ranks 1 and 3.
    # User 1: relevant {0}; recommended [2, 3, -1] -> no hit.  User 2: nothing relevant (skipped).
    top = np.array([[1, 2, 3], [2, 3, -1], [0, 1, 2]])
    relevant = sp.csr_matrix(np.array([[0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=np.float32))
    m = ev.ranking_metrics(top, relevant, n_items=5)
    assert m.users == 2
    assert m.recall == pytest.approx((1.0 + 0.0) / 2)
    dcg0 = 1 / np.log2(2) + 1 / np.log2(4)
    idcg0 = 1 / np.log2(2) + 1 / np.log2(3)
    assert m.ndcg == pytest.approx((dcg0 / idcg0 + 0.0) / 2)
    assert m.map == pytest.approx(((1 / 1 + 2 / 3) / 2 + 0.0) / 2)
    assert m.coverage == pytest.approx(4 / 5)


def test_popularity_skips_seen_items_and_orders_ties_by_item():
    train = sp.csr_matrix(np.array([
        [1, 1, 0, 0, 0],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0],
    ], dtype=np.float32))
    top = ev.popularity_top_x(train, 2)
    # Popularity order: 0 (3), 1 (2), 2 (1), then 3, 4 tied at 0.
    np.testing.assert_array_equal(top, [[2, 3], [1, 2], [3, 4]])
    np.testing.assert_array_equal(ev.popularity_top_x(train, 2, exclude_seen=False), [[0, 1]] * 3)


def test_temporal_split_holds_out_each_users_latest_rows_by_the_holdout_count_rule():
    users = np.array([0, 0, 0, 0, 0, 1, 1, 2, 0, 0])
    times = np.array([5, 1, 9, 3, 7, 2, 1, 4, 8, 9])
    mask = ev.temporal_split(users, times, 0.2)
    # User 0 has 7 rows: round(1.4) = 1 held out, the latest; of two at time 9 the later row counts as later.
    assert np.flatnonzero(mask).tolist() == [9]
    mask = ev.temporal_split(users, times, 0.5)
    # 7 rows -> 4 (times 9, 9, 8, 7); 2 rows -> 1 (time 2); 1 row -> 0 (a user keeps a training row).
    assert sorted(np.flatnonzero(mask).tolist()) == [2, 4, 5, 8, 9]

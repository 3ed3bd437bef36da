"""The fallback list: what a user the model has not seen is given, chosen on the hold-out."""

from __future__ import annotations

import numpy as np

from topx.dataset import Dataset
from topx.feature_index import FeatureIndex
from topx.steps import fallback_list
from topx.vectors import RecipeVectors


def dataset() -> tuple[Dataset, np.ndarray]:
    """6 users x 5 items: in training everyone took items 0 and 1; the held-out rows are item 4."""
    fi = FeatureIndex.one_hot([f"u{j}" for j in range(6)], [f"i{j}" for j in range(5)])
    users = np.repeat(np.arange(6), 3)
    items = np.tile([0, 1, 4], 6)
    holdout = items == 4
    return Dataset(fi, users, items, np.ones(len(users), np.float32), implicit=True), holdout


def vectors(own_term: list[float]) -> RecipeVectors:
    items = np.zeros((5, 3), np.float32)
    items[:, -1] = own_term
    return RecipeVectors(np.zeros((6, 3), np.float32), items, np.zeros(6))


def test_the_empty_users_list_wins_when_it_finds_the_held_out_items():
    ds, holdout = dataset()
    table, report = fallback_list(ds, vectors([0.1, 0.2, 0.3, 0.0, 0.9]), holdout, 2)
    frame = table.to_pandas()
    assert report["source"] == "model" and frame["source"].unique().tolist() == ["model"]
    assert frame["rank"].tolist() == [1, 2] and frame["item_id"].tolist() == ["i4", "i2"]
    assert report["model_recall_at_2"] == 1.0 and report["popularity_recall_at_2"] == 0.0


def test_popularity_wins_when_the_held_out_items_are_the_popular_ones():
    """Users 0-3 took items 0 and 1, users 4-5 items 2 and 3; users 4-5 then take item 0."""
    fi = FeatureIndex.one_hot([f"u{j}" for j in range(6)], [f"i{j}" for j in range(5)])
    users = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 4, 5])
    items = np.array([0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 0, 0])
    holdout = np.arange(len(users)) >= 12
    ds = Dataset(fi, users, items, np.ones(len(users), np.float32), implicit=True)
    table, report = fallback_list(ds, vectors([0.0, 0.0, 0.0, 0.5, 0.9]), holdout, 2)
    assert report["source"] == "popularity" and table.column("item_id").to_pylist() == ["i0", "i1"]
    assert report["popularity_recall_at_2"] == 1.0 and report["model_recall_at_2"] == 0.0


def test_without_a_hold_out_popularity_is_the_fallback_and_the_report_says_why():
    ds, _ = dataset()
    table, report = fallback_list(ds, vectors([0.1, 0.2, 0.3, 0.0, 0.9]), np.zeros(len(ds.user_rows), bool), 3)
    assert report["source"] == "popularity" and "no hold-out" in report["validated_on"]
    # Most-taken first (items 0, 1 and 4 by six users each: ties by item row), scored by their counts.
    assert table.column("item_id").to_pylist() == ["i0", "i1", "i4"]
    assert table.column("score").to_pylist() == [6.0, 6.0, 6.0]


def test_a_cap_per_group_holds_the_fallback_list_to_it_and_takes_the_next_best_instead():
    """Items 0, 1 and 4 share a group capped at 1; items 2 and 3 have none (-1, never held back)."""
    ds, _ = dataset()
    groups = np.array([0, 0, -1, -1, 0])
    table, report = fallback_list(ds, vectors([0.1, 0.2, 0.3, 0.0, 0.9]), np.zeros(len(ds.user_rows), bool), 3,
                                  diversity=(groups, 1))
    # Popularity orders i0, i1, i4, i2, i3: one of the group (i0), then the ungrouped i2 and i3.
    assert table.column("item_id").to_pylist() == ["i0", "i2", "i3"] and report["max_per_group"] == 1
    eligible = np.array([False, True, True, True, True])
    table, _ = fallback_list(ds, vectors([0.1, 0.2, 0.3, 0.0, 0.9]), np.zeros(len(ds.user_rows), bool), 2,
                             eligible, (groups, 2))
    assert table.column("item_id").to_pylist() == ["i1", "i4"]


def test_a_named_list_takes_the_source_it_is_given_without_scoring_the_candidates():
    ds, holdout = dataset()
    table, report = fallback_list(ds, vectors([0.1, 0.2, 0.3, 0.0, 0.9]), holdout, 2, source="popularity")
    assert report["source"] == "popularity" and "model_recall_at_2" not in report
    assert table.column("item_id").to_pylist() == ["i0", "i1"]

"""Filters: which items may be recommended. Checked before any work, applied exactly by the search."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from topx.cli import main
from topx.errors import ConfigError
from topx.filters import eligible_items, parse_filters, resolve_lists
from topx.steps import write_recommendations_parquet
from topx.synth import generate
from topx.vectors import RecipeVectors

TABLE = pd.DataFrame({"category": ["books", "games", "books", "toys", "games"],
                      "price": [5.0, 60.0, 20.0, 15.0, np.nan],
                      "in_stock": ["true", "true", "false", "TRUE", "true"]},
                     index=pd.Index(["i0", "i1", "i2", "i3", "i4"], name="item_id"))
IDS = ["i0", "i1", "i2", "i3", "i4", "i5"]  # i5 is not in the table: it meets no rule


def test_include_exclude_and_ids_combine_as_documented() -> None:
    rules = parse_filters({"items": {"include": [{"column": "category", "in": ["books", "games"]}],
                                     "exclude": [{"column": "in_stock", "equals": False}],
                                     "exclude_ids": ["i0"]}})
    assert eligible_items(rules, IDS, TABLE).tolist() == [False, True, False, False, True, False]
    between = parse_filters({"items": {"include": [{"column": "price", "between": [5, 20]}]}})
    assert eligible_items(between, IDS, TABLE).tolist() == [True, False, True, True, False, False]
    not_in = parse_filters({"items": {"exclude": [{"column": "category", "not_in": ["books"]}]}})
    # Excluding what is not a book keeps the books, and the items with no category at all.
    assert eligible_items(not_in, IDS, TABLE).tolist() == [True, False, True, False, False, True]


@pytest.mark.parametrize(("doc", "message"), [
    ({"item": {}}, "unknown keys ['item']"),
    ({"items": {"include": [{"column": "price", "above": 3}]}}, "items.include[0]: a rule takes exactly one operator"),
    ({"items": {"exclude": [{"column": "price", "between": [9, 1]}]}}, "items.exclude[0].between must be [low, high]"),
    ({"items": {"include": [{"column": "category", "in": []}]}}, "items.include[0].in must be a non-empty list"),
    ({"items": {"exclude_ids": "i0"}}, "items.exclude_ids must be a list"),
    ({"lists": ["summer"]}, "'lists' is an object naming each list's rules"),
    ({"lists": {"Summer Books": {}}}, "lists: 'Summer Books' is not a list name"),
    ({"lists": {"summer": {"include": [{"column": "price", "above": 3}]}}},
     "lists.summer.include[0]: a rule takes exactly one operator"),
    ({"lists": {"summer": {"max_per": {"column": "category"}}}}, "lists.summer.max_per must be"),
    ({"lists": {"summer": {"only": []}}}, "'lists.summer' is an object with keys"),
])
def test_a_malformed_file_is_refused_naming_the_rule_and_field(doc, message) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_filters(doc, "f.json")
    assert str(caught.value).startswith("f.json") and message in str(caught.value)


@pytest.mark.parametrize(("doc", "message"), [
    ({"items": {"include": [{"column": "colour", "in": ["red"]}]}},
     "items.include[0]: the items table has no column 'colour'"),
    ({"items": {"include": [{"column": "price", "in": ["cheap"]}]}},
     "items.include[0]: column 'price' holds numbers"),
    ({"items": {"exclude": [{"column": "category", "between": [1, 2]}]}},
     "items.exclude[0]: 'between' needs a numeric column"),
    ({"items": {"include": [{"column": "category", "in": ["food"]}]}}, "the filters leave no item eligible"),
])
def test_rules_that_cannot_apply_are_errors_not_silent_no_ops(doc, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        eligible_items(parse_filters(doc), IDS, TABLE)


def test_a_named_list_adds_its_rules_to_the_files_and_is_checked_by_name() -> None:
    rules = parse_filters({"items": {"exclude": [{"column": "in_stock", "equals": False}],
                                     "max_per": {"column": "category", "count": 2}},
                           "lists": {"books-only": {"include": [{"column": "category", "equals": "books"}]},
                                     "one-each": {"exclude_ids": ["i1"],
                                                  "max_per": {"column": "category", "count": 1}}}})
    default, books, one_each = resolve_lists(rules, IDS, TABLE)
    assert (default.name, books.name, one_each.name) == (None, "books-only", "one-each")
    assert default.eligible.tolist() == [True, True, False, True, True, True]
    assert books.eligible.tolist() == [True, False, False, False, False, False]   # in stock, and a book
    assert one_each.eligible.tolist() == [True, False, False, True, True, True]
    assert books.diversity[1] == 2 and one_each.diversity[1] == 1                 # its own cap, else the file's
    empty = parse_filters({"lists": {"food": {"include": [{"column": "category", "equals": "food"}]}}})
    with pytest.raises(ConfigError, match=re.escape("the filters of lists.food leave no item eligible")):
        resolve_lists(empty, IDS, TABLE)
    unknown = parse_filters({"lists": {"c": {"max_per": {"column": "colour", "count": 1}}}})
    with pytest.raises(ConfigError, match=re.escape("filters: lists.c.max_per: the items table has no column")):
        resolve_lists(unknown, IDS, TABLE)


def test_the_search_returns_the_exact_top_x_of_the_eligible_unseen_items(tmp_path) -> None:
    rng = np.random.default_rng(3)
    users, items, x = 40, 300, 7
    vectors = RecipeVectors(rng.normal(size=(users, 9)).astype(np.float32),
                            rng.normal(size=(items, 9)).astype(np.float32), rng.normal(size=users))
    seen = sp.random(users, items, density=0.1, format="csr", random_state=4)
    eligible = rng.random(items) < 0.3
    item_ids = np.array([f"i{j}" for j in range(items)], dtype=object)
    path = tmp_path / "recs.parquet"
    write_recommendations_parquet(path, vectors, np.array([f"u{u}" for u in range(users)], dtype=object), item_ids,
                                  x, seen, eligible=eligible)
    got = pq.read_table(path).to_pandas()
    scores = vectors.user_vectors.astype(np.float64) @ vectors.item_vectors.astype(np.float64).T
    for u in range(users):
        allowed = np.flatnonzero(eligible & (seen[u].toarray().ravel() == 0))
        best = allowed[np.lexsort((allowed, -scores[u, allowed]))][:x]
        mine = got[got["user_id"] == f"u{u}"].sort_values("rank")["item_id"].tolist()
        assert mine == item_ids[best].tolist(), u


def test_run_with_filters_recommends_eligible_items_only_and_checks_them_before_training(tmp_path, capsys) -> None:
    files = generate(200, 80, mean_interactions=10, implicit=True, seed=2).write(tmp_path / "data")
    items = pd.read_csv(files["items"])
    category_column = "category"
    kept = sorted(items[category_column].dropna().unique())[:2]
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"items": {"include": [{"column": category_column, "in": kept},
                                                         {"column": "price", "between": [0, 1000]}],
                                             "exclude_ids": [str(items["item_id"].iloc[0])]}}))
    out = tmp_path / "out"
    common = ["run", "--interactions", str(files["interactions"]), "--rating-col", "plays", "--items",
              str(files["items"]), "--epochs", "3", "--num-factors", "8", "--quiet"]
    assert main([*common, "--filters", str(filters), "--out", str(out)]) == 0
    recs = pd.read_parquet(out / "recommendations.parquet")
    allowed = set(items.loc[items[category_column].isin(kept), "item_id"].astype(str)) - {str(items["item_id"].iloc[0])}
    assert set(recs["item_id"]) <= allowed
    # The list for users the model has not seen obeys the filters too, and still holds x items.
    fallback = pd.read_parquet(out / "fallback.parquet")
    assert set(fallback["item_id"]) <= allowed and len(fallback) == min(10, len(allowed))
    assert json.loads((out / "metrics.json").read_text())["filters"]["eligible_items"] == len(allowed)

    # A named list: its own file, the exact top x of its own eligible items, and the default list unchanged.
    other = sorted(items[category_column].dropna().unique())[2]
    filters.write_text(json.dumps({"items": {"include": [{"column": category_column, "in": kept},
                                                         {"column": "price", "between": [0, 1000]}],
                                             "exclude_ids": [str(items["item_id"].iloc[0])]},
                                   "lists": {"other": {"include": [{"column": category_column, "equals": other}]}}}))
    # "other" is outside the file's own include rule: a named list adds rules, never lifts them.
    assert main([*common, "--filters", str(filters), "--out", str(tmp_path / "named")]) == 2
    assert "the filters of lists.other leave no item eligible" in capsys.readouterr().err
    filters.write_text(json.dumps({"items": {"exclude_ids": [str(items["item_id"].iloc[0])]},
                                   "lists": {"other": {"include": [{"column": category_column, "equals": other}]}}}))
    assert main([*common, "--filters", str(filters), "--out", str(tmp_path / "named")]) == 0
    named = pd.read_parquet(tmp_path / "named" / "lists" / "other.parquet")
    in_other = set(items.loc[items[category_column] == other, "item_id"].astype(str))
    assert len(named) > 0 and set(named["item_id"]) <= in_other
    default = pd.read_parquet(tmp_path / "named" / "recommendations.parquet")
    assert not set(default["item_id"]) <= in_other
    listed = json.loads((tmp_path / "named" / "metrics.json").read_text())["filters"]["lists"]
    assert listed == {"other": {"eligible_items": len(in_other), "rows": len(named), "file": "lists/other.parquet",
                                "fallback_file": "lists/other.fallback.parquet"}}
    # Its own fallback list: x of its own items (not the default's cut to them), by the default's source.
    own = pd.read_parquet(tmp_path / "named" / "lists" / "other.fallback.parquet")
    assert set(own["item_id"]) <= in_other and len(own) == min(10, len(in_other))

    filters.write_text(json.dumps({"items": {"exclude": [{"column": "no_such_column", "equals": 1}]}}))
    assert main([*common, "--filters", str(filters), "--out", str(tmp_path / "bad")]) == 2
    assert "items.exclude[0]: the items table has no column 'no_such_column'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_cap_per_group_gives_the_exact_best_list_with_at_most_that_many_of_each(tmp_path) -> None:
    """Brute force: over every way to pick items, the best x by score with at most `cap` per group is
    found greedily in score order (a cap is a matroid), so that is the oracle."""
    rng = np.random.default_rng(8)
    users, items, x, cap = 30, 120, 6, 2
    vectors = RecipeVectors(rng.normal(size=(users, 5)).astype(np.float32),
                            rng.normal(size=(items, 5)).astype(np.float32), np.zeros(users))
    groups = rng.integers(-1, 4, items)  # four groups, and some items in none
    seen = sp.random(users, items, density=0.1, format="csr", random_state=9)
    eligible = rng.random(items) < 0.8
    item_ids = np.array([f"i{j}" for j in range(items)], dtype=object)
    path = tmp_path / "recs.parquet"
    write_recommendations_parquet(path, vectors, np.array([f"u{u}" for u in range(users)], dtype=object), item_ids,
                                  x, seen, eligible=eligible, diversity=(groups, cap))
    got = pq.read_table(path).to_pandas()
    scores = vectors.user_vectors.astype(np.float64) @ vectors.item_vectors.astype(np.float64).T
    for u in range(users):
        allowed = np.flatnonzero(eligible & (seen[u].toarray().ravel() == 0))
        expected, taken = [], {}
        for item in allowed[np.lexsort((allowed, -scores[u, allowed]))]:
            g = groups[item]
            if g >= 0 and taken.get(g, 0) >= cap:
                continue
            taken[g] = taken.get(g, 0) + 1
            expected.append(item)
            if len(expected) == x:
                break
        mine = got[got["user_id"] == f"u{u}"].sort_values("rank")["item_id"].tolist()
        assert mine == item_ids[expected].tolist(), u


def test_max_per_is_checked_like_the_rules() -> None:
    with pytest.raises(ConfigError, match=re.escape("items.max_per must be")):
        parse_filters({"items": {"max_per": {"column": "category", "count": 0}}}, "f.json")
    from topx.filters import item_groups

    with pytest.raises(ConfigError, match="items.max_per: the items table has no column 'genre'"):
        item_groups(parse_filters({"items": {"max_per": {"column": "genre", "count": 2}}}), IDS, TABLE)
    groups, cap = item_groups(parse_filters({"items": {"max_per": {"column": "category", "count": 2}}}), IDS, TABLE)
    assert cap == 2 and groups[0] == groups[2] != groups[1] and groups[5] == -1


def test_responses_leave_items_out_of_the_next_lists_without_retraining(tmp_path) -> None:
    files = generate(150, 60, mean_interactions=10, implicit=True, seed=6).write(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["run", "--interactions", str(files["interactions"]), "--rating-col", "plays", "--epochs", "3",
                 "--num-factors", "8", "--quiet", "--out", str(out)]) == 0
    before = pd.read_parquet(out / "recommendations.parquet")
    first = before[before["rank"] == 1][["user_id", "item_id"]]
    responses = tmp_path / "dismissed.csv"
    first.assign(time="2024-05-01").to_csv(responses, index=False)  # every user dismissed their top item
    model = (out / "model" / "model.tar.gz").read_bytes()

    assert main(["refresh", "--run", str(out), "--responses", str(responses), "--quiet"]) == 0  # = recommend
    after = pd.read_parquet(out / "recommendations.parquet")
    assert (out / "model" / "model.tar.gz").read_bytes() == model, "nothing was retrained"
    merged = after.merge(first, on=["user_id", "item_id"])
    assert merged.empty, "a dismissed item came back"
    # The lists move up by one: each user's old second item is now first.
    second = before[before["rank"] == 2].set_index("user_id")["item_id"]
    new_first = after[after["rank"] == 1].set_index("user_id")["item_id"]
    assert (new_first == second.reindex(new_first.index)).all()

    fresh = tmp_path / "fresh"
    assert main(["run", "--interactions", str(files["interactions"]), "--rating-col", "plays", "--epochs", "3",
                 "--num-factors", "8", "--quiet", "--responses", str(responses), "--out", str(fresh)]) == 0
    assert pd.read_parquet(fresh / "recommendations.parquet").merge(first, on=["user_id", "item_id"]).empty


def test_recommend_writes_each_named_list_beside_the_default_one(tmp_path) -> None:
    """New rules, and a new named list, for a trained run without retraining."""
    files = generate(150, 60, mean_interactions=10, implicit=True, seed=5).write(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["run", "--interactions", str(files["interactions"]), "--rating-col", "plays", "--epochs", "2",
                 "--num-factors", "8", "--quiet", "--out", str(out)]) == 0
    items = pd.read_csv(files["items"])
    chosen = sorted(items["category"].dropna().unique())[0]
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"lists": {"first-category": {
        "include": [{"column": "category", "equals": chosen}], "max_per": {"column": "category", "count": 3}}}}))
    assert main(["recommend", "--run", str(out), "--filters", str(filters), "--items", str(files["items"]),
                 "--item-key", "item_id", "--top-x", "5", "--quiet"]) == 0
    named = pd.read_parquet(out / "lists" / "first-category.parquet")
    in_category = set(items.loc[items["category"] == chosen, "item_id"].astype(str))
    assert set(named["item_id"]) <= in_category and named.groupby("user_id").size().max() == 3
    default = pd.read_parquet(out / "recommendations.parquet")
    assert default.groupby("user_id").size().max() == 5 and not set(default["item_id"]) <= in_category
    # The fallback lists follow the new rules too: the named list's holds its category, 3 at most of it.
    own = pd.read_parquet(out / "lists" / "first-category.fallback.parquet")
    assert set(own["item_id"]) <= in_category and len(own) == 3
    assert len(pd.read_parquet(out / "fallback.parquet")) == 5
    assert not list(out.glob("**/.*.tmp"))

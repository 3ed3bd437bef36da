"""The deploy contract (topx/contract.py): the layout and keys it builds are the ones deployed stacks hold,
and the hyperparameters and searches it names are the ones topx runs."""

from __future__ import annotations

import math
from dataclasses import fields, replace
from typing import Any

import numpy as np
import pytest

from topx import contract
from topx.config import HyperParameters
from topx.errors import ConfigError
from topx.search import search_top_x

RUN = "20260101T000000000000Z-abc"


def test_run_keys_lie_under_the_run_and_the_expiring_prefix() -> None:
    keys = [
        contract.prepared_prefix(RUN), contract.model_prefix(RUN), contract.vectors_prefix(RUN),
        contract.run_record_key(RUN), contract.metrics_key(RUN), contract.recommendations_key(RUN, 3),
        contract.searched_key(RUN, 3), contract.loaded_key(RUN, 3),
    ]  # fmt: skip
    assert all(key.startswith(contract.run_prefix(RUN)) for key in keys)
    assert contract.run_prefix(RUN).startswith(contract.RUNS_PREFIX)
    # Buckets deployed before the contract hold these keys: they must not move.
    assert contract.recommendations_key(RUN, 3) == f"runs/{RUN}/recommendations/shard=0003/part-0.parquet"
    assert contract.searched_key(RUN, 12) == f"runs/{RUN}/searched/shard=0012.json"
    assert contract.loaded_key(RUN, 0) == f"runs/{RUN}/loaded/shard=0000.json"
    assert (contract.prepared_prefix(RUN), contract.run_record_key(RUN)) == (f"runs/{RUN}/prepared/", f"runs/{RUN}/run.json")


def test_versions_lie_outside_the_prefix_the_lifecycle_rule_expires() -> None:
    kept = [contract.version_metrics_key(RUN), contract.version_record_key(RUN),
            contract.version_shard_prefix(RUN, 1) + contract.MANIFEST_SEARCHED]
    assert not any(key.startswith(contract.RUNS_PREFIX) for key in kept)
    assert all(key.startswith(contract.version_prefix(RUN)) for key in kept)
    assert contract.version_shard_prefix(RUN, 1) == f"versions/{RUN}/shard=0001/"


@pytest.mark.parametrize(
    ("key", "version", "shard"),
    [
        (contract.version_metrics_key(RUN), RUN, None),
        (contract.version_record_key(RUN), RUN, None),
        (contract.version_shard_prefix(RUN, 3) + contract.MANIFEST_RETIRED, RUN, "0003"),
        (contract.version_shard_prefix(RUN, 7) + contract.MANIFEST_RECOMMENDATIONS, RUN, "0007"),
        (contract.version_shard_prefix(RUN, 12345) + contract.MANIFEST_SEARCHED, RUN, "12345"),
    ],
)
def test_the_version_pattern_reads_back_the_keys_the_contract_builds(key: str, version: str, shard: str | None) -> None:
    found = contract.VERSION_OBJECT_RE.fullmatch(key)
    assert found is not None and (found["version"], found["shard"]) == (version, shard)


@pytest.mark.parametrize("key", ["versions/notes.txt", f"versions/{RUN}/shard=0001/other.json", f"runs/{RUN}/metrics.json"])
def test_the_version_pattern_ignores_objects_the_stages_did_not_write(key: str) -> None:
    assert contract.VERSION_OBJECT_RE.fullmatch(key) is None


def test_upload_and_side_table_keys() -> None:
    assert contract.incoming_key("ratings.csv") == contract.incoming_key("incoming/ratings.csv") == "incoming/ratings.csv"
    assert contract.feature_table_prefix("users") == "features/users"


def test_table_keys() -> None:
    assert contract.user_item_key("u1", "v1") == {"pk": "user#u1", "sk": "v#v1"}
    assert dict(contract.POINTER_KEY) == {"pk": "pointer", "sk": "active"}
    assert contract.table_key_schema() == [{"AttributeName": "pk", "KeyType": "HASH"},
                                           {"AttributeName": "sk", "KeyType": "RANGE"}]
    assert contract.table_attribute_definitions() == [{"AttributeName": "pk", "AttributeType": "S"},
                                                      {"AttributeName": "sk", "AttributeType": "S"}]


def test_the_contract_names_every_settable_hyperparameter_with_its_type() -> None:
    """HyperParameters validates its own fields; the contract lists which of them a deployment may set."""
    names = {f.name for f in fields(HyperParameters)}
    assert names >= contract.FIXED_HYPERPARAMETERS
    assert set(contract.HYPERPARAMETER_RANGES) | set(contract.HYPERPARAMETER_CHOICES) == (
        names - contract.FIXED_HYPERPARAMETERS
    )
    defaults = HyperParameters()
    for name, (kind, _, _) in contract.HYPERPARAMETER_RANGES.items():
        assert type(getattr(defaults, name)) is kind, name
    for name, choices in contract.HYPERPARAMETER_CHOICES.items():
        assert getattr(defaults, name) in choices, name


def _range_samples() -> list[tuple[str, Any, bool]]:
    """(name, value, accepted): each range's ends and the values just beyond them."""
    samples: list[tuple[str, Any, bool]] = []
    for name, (kind, low, high) in contract.HYPERPARAMETER_RANGES.items():
        step = 1 if kind is int else 0.001
        for value, inside in ((low - step, False), (low, True), (high - step, True), (high, False)):
            if math.isfinite(value):
                samples.append((name, kind(value), inside))
    for name, choices in contract.HYPERPARAMETER_CHOICES.items():
        samples += [(name, choice, True) for choice in choices] + [(name, "x", False)]
    return samples


@pytest.mark.parametrize(("name", "value", "accepted"), _range_samples())
def test_hyperparameters_accept_exactly_the_contract_ranges(name: str, value: Any, accepted: bool) -> None:
    if accepted:
        assert getattr(replace(HyperParameters(), **{name: value}), name) == value
    else:
        with pytest.raises(ConfigError, match=name):
            replace(HyperParameters(), **{name: value})


@pytest.mark.parametrize("method", contract.SEARCH_METHODS)
def test_every_search_method_the_contract_names_is_one_topx_runs(method: str) -> None:
    rng = np.random.default_rng(3)
    user_vectors, item_vectors = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(50, 4)).astype(np.float32)
    top = search_top_x(user_vectors, item_vectors, 3, method=method)
    assert top.items.shape == (5, 3) and (top.items >= 0).all()


def test_the_default_search_is_one_of_them() -> None:
    assert contract.DEFAULT_SEARCH_METHOD in contract.SEARCH_METHODS
    assert contract.MIN_SHARDS <= contract.DEFAULT_SHARDS <= contract.MAX_SHARDS

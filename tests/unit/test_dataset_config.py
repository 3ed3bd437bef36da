"""The dataset configuration: one vocabulary (the CLI's option names) and one rule (topx.contract) for
`topx run --dataset FILE`, the CDK context and config/dataset.json; flags override the file's fields."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from topx import contract
from topx.cli import _data_options, build_parser, main
from topx.dataset import DataOptions, data_options, read_dataset_config
from topx.errors import ConfigError
from topx.synth import generate

FAST = ["--epochs", "3", "--num-factors", "8", "--quiet"]


def options_for(*argv: str) -> DataOptions:
    return _data_options(build_parser().parse_args(["run", *argv, "--out", "unused"]))


def write_config(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def test_every_field_is_a_topx_run_option_of_the_same_name() -> None:
    """One vocabulary: a field is the option that sets it, dashes as underscores."""
    run = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    flags = {flag for action in run._actions for flag in action.option_strings}
    assert {f"--{name.replace('_', '-')}" for name in contract.DATASET_FIELDS} <= flags


def test_the_file_sets_the_data_options_and_flags_override_its_fields(tmp_path: Path) -> None:
    config = write_config(tmp_path / "dataset.json", {
        "interactions": "export/", "items": "/abs/items.csv", "user_col": "customer", "item_col": "sku",
        "rating_col": "qty", "time_col": "ts", "since": 90, "objective": "rating", "min_rating": 2,
        "item_key": "product", "no_cold_items": True, "max_bytes": 5000, "sep": "\\t"})
    opts = options_for("--dataset", str(config))
    # Relative paths are the file's folder's; absolute ones and s3:// URIs are kept.
    assert opts.interactions == str(tmp_path / "export") and opts.items == "/abs/items.csv"
    assert (opts.user_col, opts.item_col, opts.rating_col, opts.time_col) == ("customer", "sku", "qty", "ts")
    assert (opts.since, opts.implicit, opts.min_rating, opts.item_key) == ("90", False, 2.0, "product")
    assert (opts.cold_items, opts.cold_users, opts.max_bytes, opts.sep) == (False, True, 5000, "\t")

    over = options_for("--dataset", str(config), "--interactions", "other.csv", "--user-col", "buyer",
                       "--objective", "ranking", "--max-bytes", "10", "--since", "2024-05-01")
    assert (over.interactions, over.user_col, over.implicit, over.max_bytes) == ("other.csv", "buyer", True, 10)
    assert (over.since, over.item_col) == ("2024-05-01", "sku")
    # --implicit is still a way to say --objective ranking, over the file's objective.
    assert options_for("--dataset", str(config), "--implicit").implicit is True


def test_without_a_file_the_defaults_are_the_options_defaults() -> None:
    opts = options_for("--interactions", "r.csv")
    # A column named timestamp is the time column, when the file has one.
    assert opts == DataOptions("r.csv", implicit=True, time_col="timestamp", time_optional=True)
    assert options_for("--interactions", "r.csv", "--time-col", "ts") == DataOptions("r.csv", implicit=True,
                                                                                    time_col="ts")
    assert options_for("--interactions", "r.csv", "--no-time-col") == DataOptions("r.csv", implicit=True)
    no_header = options_for("--interactions", "r.csv", "--no-header")
    assert (no_header.user_col, no_header.time_col) == (0, None)
    assert data_options({"interactions": "r.csv", "no_header": True}).rating_col == 2
    assert DataOptions("r.csv").max_bytes == contract.DEFAULT_MAX_BYTES


@pytest.mark.parametrize(("doc", "message"), [
    ({"user_col": True}, "user_col: expected a column name, or a 0-based position, got True"),
    ({"usercol": "u"}, "usercol: unknown field; the fields are interactions, users, items, user_col"),
    ({"objective": "clicks"}, "objective: expected one of ranking, rating, got 'clicks'"),
    ({"half_life_days": 30, "no_time_col": True}, "half_life_days: needs a time column (time_col)"),
    ({"recency_boost": 1, "no_header": True}, "recency_boost: needs a time column (time_col)"),
    ({"recency_boost": -1}, "recency_boost: expected a number >= 0, got -1"),
    ({"time_col": "t", "no_time_col": True}, "no_time_col: contradicts time_col: leave one of them out"),
    ({"time_col": "t", "since": "last week"}, "since: expected an ISO-8601 date (e.g. 2024-05-01)"),
    ({"max_bytes": 0}, "max_bytes: expected a positive whole number of bytes, got 0"),
    ({"sep": ";;"}, "sep: expected one character other than a quote or newline"),
    ({"user_col": "id", "item_col": "id"}, "item_col: names column 'id', as user_col does"),
    (["user_col"], "expected a JSON object of dataset fields, got list"),
])
def test_a_bad_file_is_refused_naming_the_file_and_the_field(tmp_path: Path, capsys, doc: object,
                                                             message: str) -> None:
    config = write_config(tmp_path / "dataset.json", doc)
    assert main(["run", "--dataset", str(config), "--interactions", "r.csv", "--out", str(tmp_path / "o")]) == 2
    assert f"topx: error: {config}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_file_and_flags_that_disagree_together_are_refused(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path / "dataset.json", {"interactions": "r.csv", "half_life_days": 30, "time_col": "t"})
    assert options_for("--dataset", str(config)).half_life_days == 30
    with pytest.raises(ConfigError, match=r"dataset.json with the options given: time_col: names column 't', as "
                                          r"item_col does"):
        options_for("--dataset", str(config), "--item-col", "t")
    assert main(["run", "--dataset", str(tmp_path / "missing.json"), "--out", "o"]) == 2
    assert "missing.json: file not found" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{'user_col': 1}")
    with pytest.raises(ConfigError, match="broken.json: the dataset configuration is not valid JSON"):
        read_dataset_config(str(tmp_path / "broken.json"))
    with pytest.raises(ConfigError, match="no interactions: give --interactions, or interactions in the dataset"):
        options_for("--user-col", "u")


def test_the_deployment_refuses_what_only_the_cli_reads() -> None:
    with pytest.raises(contract.DatasetConfigError, match="interactions: the deployment trains on what arrives "
                                                          "under incoming/"):
        contract.check_dataset_config({"interactions": "x.csv"}, deployed=True)
    with pytest.raises(contract.DatasetConfigError, match="users: expected a key under features/ in the data bucket"):
        contract.check_dataset_config({"users": "s3://other/users.csv"}, deployed=True)
    # A null field unsets the one beneath it; the merged fields are checked together.
    merged = contract.merge_dataset_configs({"time_col": "t", "since": "30", "user_col": "u"},
                                            {"since": None, "item_col": "i"})
    assert merged == {"time_col": "t", "user_col": "u", "item_col": "i"}
    with pytest.raises(contract.DatasetConfigError, match="since: needs a time column"):
        contract.merge_dataset_configs({"time_col": "t", "since": "30"}, {"time_col": None, "no_time_col": True})


def test_run_reads_a_single_csv_with_other_column_names_through_the_file(tmp_path: Path) -> None:
    data = generate(150, 60, mean_interactions=10, implicit=True, seed=9).interactions
    data.rename(columns={"user_id": "Customer ID", "item_id": "Product", "plays": "Quantity"}).to_csv(
        tmp_path / "orders.csv", sep=";", index=False)
    config = write_config(tmp_path / "dataset.json", {
        "interactions": "orders.csv", "user_col": "Customer ID", "item_col": "Product", "rating_col": "Quantity",
        "objective": "ranking", "sep": ";"})
    out = tmp_path / "out"
    assert main(["run", "--dataset", str(config), "--out", str(out), *FAST]) == 0
    recs = pd.read_parquet(out / "recommendations.parquet")
    assert set(recs["user_id"]) == set(data["user_id"].astype(str))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["rows_read"] == len(data)


def test_recommend_takes_the_items_table_and_its_key_from_the_file(tmp_path: Path) -> None:
    files = generate(120, 50, mean_interactions=10, implicit=True, seed=3).write(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["run", "--interactions", str(files["interactions"]), "--rating-col", "plays", "--out", str(out),
                 *FAST]) == 0
    items = pd.read_csv(files["items"])
    key = items.columns[0]
    renamed = items.rename(columns={key: "sku"})
    renamed.to_csv(tmp_path / "catalogue.csv", index=False)
    column = next(c for c in renamed.columns if c != "sku")
    kept = renamed[column].iloc[0]
    (tmp_path / "filters.json").write_text(json.dumps({"items": {"include": [{"column": column, "in": [kept]}]}}))
    config = write_config(tmp_path / "dataset.json", {"items": "catalogue.csv", "item_key": "sku"})
    assert main(["recommend", "--run", str(out), "--dataset", str(config), "--filters",
                 str(tmp_path / "filters.json"), "--quiet"]) == 0
    eligible = set(renamed.loc[renamed[column] == kept, "sku"].astype(str))
    recommended = set(pd.read_parquet(out / "recommendations.parquet")["item_id"])
    assert recommended and recommended <= eligible < set(renamed["sku"].astype(str))


def _json_blocks(path: Path, heading: str) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    section = text[text.index(heading):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", section, flags=re.S)]


def test_the_documented_exports_are_configurations_topx_accepts() -> None:
    root = Path(__file__).resolve().parents[2]
    cli = _json_blocks(root / "README.md", "### The dataset configuration")
    deployed = _json_blocks(root / "docs" / "DEPLOY.md", "### The dataset configuration")
    assert len(cli) == len(deployed) == 3
    for local, remote in zip(cli, deployed, strict=True):
        assert data_options(contract.check_dataset_config(local)).interactions == local["interactions"]
        contract.check_dataset_config(remote, deployed=True)
        # The deployed one is the README's without interactions, its items table under features/.
        assert {k: v for k, v in local.items() if k not in ("interactions", "items")} == \
               {k: v for k, v in remote.items() if k != "items"}

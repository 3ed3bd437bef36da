"""The command line as a user runs it: whole runs, stages, errors, and outputs never half-written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from topx.cli import ALIASES, build_parser, main
from topx.contract import DEFAULT_RECENCY_BOOST
from topx.synth import generate

FAST = ["--epochs", "3", "--num-factors", "8", "--quiet"]


@pytest.fixture(scope="module")
def explicit_csv(tmp_path_factory) -> Path:
    """A header CSV with other column names and float ratings."""
    data = generate(300, 120, mean_interactions=15, implicit=False, seed=1)
    frame = data.interactions.rename(columns={"user_id": "customer", "item_id": "sku", "rating": "stars"})
    frame["stars"] = frame["stars"] - 0.25
    path = tmp_path_factory.mktemp("explicit") / "ratings.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def implicit_files(tmp_path_factory) -> dict[str, Path]:
    return generate(300, 120, mean_interactions=15, implicit=True, seed=2).write(tmp_path_factory.mktemp("implicit"))


def read_recs(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "recommendations.parquet")


def test_run_on_renamed_columns_and_float_ratings(explicit_csv, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", "--interactions", str(explicit_csv), "--user-col", "customer", "--item-col", "sku",
                 "--rating-col", "stars", "--objective", "rating", "--top-x", "5", "--out", str(out), *FAST])
    assert code == 0
    recs = read_recs(out)
    assert list(recs.columns) == ["user_id", "rank", "item_id", "score", "cold_user"]
    ratings = pd.read_csv(explicit_csv, dtype={"customer": str, "sku": str})
    assert recs["user_id"].nunique() == ratings["customer"].nunique()
    assert (recs.groupby("user_id")["rank"].apply(list) == pd.Series([[1, 2, 3, 4, 5]] * recs["user_id"].nunique(),
            index=sorted(recs["user_id"].unique()))).all()
    seen = set(zip(ratings["customer"], ratings["sku"], strict=True))
    assert not any((u, i) in seen for u, i in zip(recs["user_id"], recs["item_id"], strict=True))
    assert (recs.groupby("user_id")["score"].apply(lambda s: s.is_monotonic_decreasing)).all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["predictor_type"] == "regressor" and metrics["rmse"] > 0
    assert {"recall_at_5", "popularity_recall_at_5", "ndcg_at_5", "map_at_5", "coverage_at_5"} <= set(metrics)
    for part in ("model/model.tar.gz", "model/feature_index.json", "vectors/item_vectors.npy"):
        assert (out / part).exists(), part
    assert "rmse" in capsys.readouterr().out


def test_with_no_mode_flag_ratings_train_for_ranking_and_min_rating_keeps_the_liked(explicit_csv, tmp_path):
    out = tmp_path / "out"
    code = main(["run", "--interactions", str(explicit_csv), "--user-col", "customer", "--item-col", "sku",
                 "--rating-col", "stars", "--min-rating", "3", "--top-x", "5", "--out", str(out), *FAST])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["objective"], metrics["predictor_type"], metrics["learner"]) == ("ranking", "binary_classifier",
                                                                                     "icd")
    assert "rmse" not in metrics and "log_loss" not in metrics and 0.5 < metrics["auc"] <= 1.0
    ratings = pd.read_csv(explicit_csv, dtype={"customer": str, "sku": str})
    assert metrics["data"]["rows_below_min_rating_dropped"] == int((ratings["stars"] < 3).sum()) > 0
    assert metrics["lift_over_popularity_recall_at_5"] == pytest.approx(
        metrics["recall_at_5"] / metrics["popularity_recall_at_5"])
    # Only liked rows are positives: they are the seen items left out of the lists.
    liked = ratings[ratings["stars"] >= 3]
    recs = read_recs(out)
    assert not set(zip(recs["user_id"], recs["item_id"], strict=True)) & set(zip(liked["customer"], liked["sku"],
                                                                                 strict=True))


@pytest.mark.parametrize(("flags", "message"), [
    (["--implicit", "--objective", "rating"], "cannot go with --objective rating"),
    (["--objective", "rating", "--learner", "icd"], "icd learner trains for ranking"),
    (["--predictor-type", "regressor", "--objective", "ranking"], "trains for rating"),
])
def test_contradictory_mode_flags_are_refused(explicit_csv, tmp_path, capsys, flags, message):
    code = main(["run", "--interactions", str(explicit_csv), "--user-col", "customer", "--item-col", "sku",
                 "--rating-col", "stars", *flags, "--out", str(tmp_path / "out"), *FAST])
    assert code == 2 and message in capsys.readouterr().err


def test_run_on_implicit_play_counts_with_features(implicit_files, tmp_path):
    out = tmp_path / "out"
    code = main(["run", "--interactions", str(implicit_files["interactions"]), "--rating-col", "plays",
                 "--implicit", "--users", str(implicit_files["users"]), "--items", str(implicit_files["items"]),
                 "--out", str(out), *FAST])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["predictor_type"] == "binary_classifier"
    assert 0.5 < metrics["auc"] <= 1.0
    assert metrics["data"]["n_features"] > 300 + 120
    assert len(read_recs(out)) == 300 * 10


def test_headerless_tsv_with_positional_columns(tmp_path):
    rows = ["a\tx\t5", "a\ty\t3", "b\tx\t4", "b\tz\t1", "c\ty\t2", "c\tz\t5"]
    path = tmp_path / "r.tsv"
    path.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert main(["run", "--interactions", str(path), "--no-header", "--top-x", "1", "--holdout", "0",
                 "--out", str(out), *FAST]) == 0
    recs = read_recs(out)
    # Each user has seen two of the three items: the one left is recommended.
    assert dict(zip(recs["user_id"], recs["item_id"], strict=True)) == {"a": "z", "b": "y", "c": "x"}


def test_ids_stay_strings(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("user_id,item_id,rating\n007,1,5\n7,01,3\n007,2,4\n7,2,1\n")
    out = tmp_path / "out"
    assert main(["run", "--interactions", str(path), "--holdout", "0", "--top-x", "2", "--out", str(out), *FAST]) == 0
    recs = read_recs(out)
    assert set(recs["user_id"]) == {"007", "7"}
    assert set(recs["item_id"]) <= {"1", "01", "2"}


def test_stages_reproduce_the_whole_run(implicit_files, tmp_path):
    args = ["--interactions", str(implicit_files["interactions"]), "--rating-col", "plays", "--implicit", *FAST]
    whole, staged = tmp_path / "whole", tmp_path / "staged"
    assert main(["run", *args, "--out", str(whole)]) == 0
    assert main(["train", *args, "--out", str(staged)]) == 0
    assert main(["--quiet", "vectors", "--run", str(staged)]) == 0
    assert main(["--quiet", "recommend", "--run", str(staged)]) == 0
    assert main(["--quiet", "evaluate", "--run", str(staged)]) == 0
    pd.testing.assert_frame_equal(read_recs(whole), read_recs(staged))
    m1 = json.loads((whole / "metrics.json").read_text())
    m2 = json.loads((staged / "metrics.json").read_text())
    assert m1["recall_at_10"] == pytest.approx(m2["recall_at_10"])
    assert m1["search_method"] == m2["search_method"] == "exact"  # the search the metrics were ranked by


def test_faiss_search_writes_the_same_recommendations_as_the_exact_scan(implicit_files, tmp_path, monkeypatch):
    import topx.steps

    methods, searched = [], topx.steps.iter_top_x

    def recording(*args, method="exact", **kwargs):
        methods.append(method)
        return searched(*args, method=method, **kwargs)

    monkeypatch.setattr(topx.steps, "iter_top_x", recording)
    run = tmp_path / "run"
    assert main(["train", "--interactions", str(implicit_files["interactions"]), "--rating-col", "plays",
                 "--implicit", "--out", str(run), *FAST]) == 0
    assert main(["--quiet", "vectors", "--run", str(run)]) == 0
    methods.clear()  # training ranked its hold-out per epoch with the same search; only recommend counts here
    assert main(["--quiet", "recommend", "--run", str(run)]) == 0
    exact = read_recs(run)
    assert main(["--quiet", "recommend", "--run", str(run), "--search-method", "faiss"]) == 0
    faiss = read_recs(run)
    assert len(faiss) == 300 * 10
    pd.testing.assert_frame_equal(faiss, exact)
    assert methods == ["exact", "faiss"]


def test_search_method_reaches_the_run_options_and_a_bad_one_is_refused(tmp_path, capsys):
    from topx.cli import _run_options

    parser = build_parser()
    args = parser.parse_args(["run", "--interactions", "r.csv", "--out", "o", "--search-method", "hnsw"])
    assert _run_options(args).search_method == "hnsw"
    assert _run_options(parser.parse_args(["recommend", "--run", "r"])).search_method == "exact"
    with pytest.raises(SystemExit) as exit_info:
        main(["recommend", "--run", str(tmp_path), "--search-method", "annoy"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "--search-method" in err and "invalid choice: 'annoy'" in err and "exact" in err and "faiss" in err


def test_vectors_from_a_bare_model_and_one_hot_id_lists(implicit_files, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--interactions", str(implicit_files["interactions"]), "--rating-col", "plays",
                 "--implicit", "--out", str(run), *FAST]) == 0
    index = json.loads((run / "model" / "feature_index.json").read_text())
    (tmp_path / "users.txt").write_text("\n".join(index["user_ids"]))
    (tmp_path / "items.txt").write_text("\n".join(index["item_ids"]))
    out = tmp_path / "vec"
    assert main(["--quiet", "vectors", "--model", str(run / "model" / "model.tar.gz"),
                 "--one-hot-users", str(tmp_path / "users.txt"), "--one-hot-items", str(tmp_path / "items.txt"),
                 "--out", str(out)]) == 0
    assert main(["--quiet", "vectors", "--run", str(run)]) == 0
    np.testing.assert_allclose(np.load(out / "item_vectors.npy"), np.load(run / "vectors" / "item_vectors.npy"),
                               rtol=1e-6)


def test_bad_input_is_one_clear_line_and_leaves_the_old_output(explicit_csv, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "--interactions", str(explicit_csv), "--user-col", "customer", "--item-col", "sku",
                 "--rating-col", "stars", "--out", str(out), *FAST]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id,rating\nu1,i1,4\nu2,i2,lots\n")
    capsys.readouterr()
    code = main(["run", "--interactions", str(bad), "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert "bad.csv" in err and "row 3" in err and "rating" in err
    assert "Traceback" not in err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_missing_column_and_missing_file_are_user_errors(tmp_path, capsys):
    path = tmp_path / "r.csv"
    path.write_text("user,item,rating\na,b,1\n")
    assert main(["run", "--interactions", str(path), "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "user_id" in capsys.readouterr().err
    assert main(["run", "--interactions", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "nope.csv" in capsys.readouterr().err
    assert main(["vectors", "--out", str(tmp_path / "o")]) == 2


def test_every_command_explains_its_options(capsys):
    import argparse

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) >= {"run", "train", "vectors", "recommend", "evaluate", "demo"}
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, f"topx {name}: {action.option_strings} has no help text"
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"])
        assert exit_info.value.code == 0
        # An alias (refresh) prints its command's usage.
        assert f"usage: topx {ALIASES.get(name, name)}" in capsys.readouterr().out


def test_demo_runs_small(tmp_path, capsys):
    """`make demo`: upload to S3, the deployed state machine under moto, recommendations read from DynamoDB."""
    out = tmp_path / "demo"
    assert main(["demo", "--users", "200", "--items", "80", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "the upload rule queued it and the starter started execution" in text
    for state in ("Prepare", "Train", "QualityGate", "Repackage", "Search", "Load", "Report", "Publish", "NotifySuccess"):
        assert re.search(rf"^  {state} +done in", text, re.MULTILINE), state
    assert "read back from DynamoDB through the pointer" in text
    assert re.search(r"^  u00000:\n +1\. i\d+", text, re.MULTILINE)
    assert "recall_at_10" in text and "popularity" in text
    # --out keeps the run's objects, as the pipeline wrote them to S3.
    assert (out / "metrics.json").exists() and (out / "model" / "model.tar.gz").exists()
    assert (out / "report.html").exists() and f"report: {(out / 'report.html').resolve()}" in text
    assert len(list(out.glob("recommendations/shard=*/part-0.parquet"))) == 4


def test_demo_without_aws_stand_ins_runs_small(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--quiet", "demo", "--no-aws-stand-ins", "--users", "200", "--items", "80", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "recall_at_10" in text and "popularity" in text
    assert (out / "recommendations.parquet").exists()


def test_demo_local_is_refused_naming_its_new_name(capsys):
    """`--local` meant "without the AWS stand-ins" while the stand-ins lived in a module named local: renamed, hidden."""
    assert main(["demo", "--local"]) == 2
    assert "`topx demo --no-aws-stand-ins`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    shown = capsys.readouterr().out
    assert "--no-aws-stand-ins" in shown and "--local" not in shown


def test_demo_without_moto_names_the_extra_to_install(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "moto", None)  # as if not installed: find_spec and import both fail
    assert main(["demo", "--users", "50", "--items", "20"]) == 2
    captured = capsys.readouterr()
    assert "moto missing" in captured.err and "pip install 'topx[offline]'" in captured.err
    assert "generated" not in captured.out  # refused before any work


def test_recordio_protobuf_trains_the_same_model_as_the_equivalent_csv(tmp_path):
    from topx.feature_index import FeatureIndex
    from topx.formats.artifact import read_model_artifact
    from topx.formats.recordio import write_recordio_protobuf

    data = generate(120, 60, mean_interactions=8, implicit=False, seed=3).interactions
    data = data.drop_duplicates(["user_id", "item_id"]).reset_index(drop=True)
    csv = tmp_path / "ratings.csv"
    data.to_csv(csv, index=False)
    # SageMaker's usual layout: user one-hot rows first, then items; one record per interaction.
    index = FeatureIndex.one_hot(sorted(data["user_id"].unique()), sorted(data["item_id"].unique()))
    users = data["user_id"].map({u: k for k, u in enumerate(index.user_ids)}).to_numpy()
    items = data["item_id"].map({i: k for k, i in enumerate(index.item_ids)}).to_numpy()
    recordio = tmp_path / "train.recordio"
    write_recordio_protobuf(recordio, index.user_x[users] + index.item_x[items], data["rating"].to_numpy(np.float32))
    index.save(tmp_path / "index")

    args = ["--holdout", "0", "--epochs", "4", "--num-factors", "4", "--quiet"]
    assert main(["train", "--interactions", str(csv), "--objective", "rating", "--out", str(tmp_path / "from_csv"),
                 *args]) == 0
    assert main(["train", "--interactions", str(recordio), "--feature-index", str(tmp_path / "index"),
                 "--out", str(tmp_path / "from_recordio"), *args]) == 0
    a = read_model_artifact(tmp_path / "from_csv" / "model")
    b = read_model_artifact(tmp_path / "from_recordio" / "model")
    np.testing.assert_allclose(b.factors, a.factors, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.linear, a.linear, rtol=1e-5, atol=1e-6)
    assert b.bias == pytest.approx(a.bias, rel=1e-6)
    # The feature index travels with the model, so the run goes on to vectors as usual.
    assert main(["--quiet", "vectors", "--run", str(tmp_path / "from_recordio")]) == 0


def test_corrupt_recordio_is_a_clear_error(tmp_path, capsys):
    from topx.formats.recordio import write_recordio_protobuf

    path = tmp_path / "train.recordio"
    write_recordio_protobuf(path, np.eye(3, dtype=np.float32), np.ones(3, np.float32))
    path.write_bytes(path.read_bytes()[:-7])
    assert main(["train", "--interactions", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "train.recordio" in err and "offset" in err


def test_tune_reports_its_grid_and_run_tune_trains_with_the_winner(explicit_csv, tmp_path, capsys):
    columns = ["--interactions", str(explicit_csv), "--user-col", "customer", "--item-col", "sku",
               "--rating-col", "stars", *FAST]
    assert main(["tune", *columns]) == 0
    printed = capsys.readouterr().out
    report = json.loads(printed[: printed.rindex("}") + 1])
    assert len(report["trials"]) == 18 and report["metric"] == "recall_at_10"
    assert report["best_score"] == max([report["given_score"], *(t["recall_at_10"] for t in report["trials"])])
    assert set(report["chosen"]) == {"factors_wd", "unobserved_weight", "linear_wd"}
    best_trial = max(report["trials"], key=lambda t: t["recall_at_10"])
    assert report["best_point"] == {k: v for k, v in best_trial.items() if k != "recall_at_10"} or \
        report["best_score"] == report["given_score"]
    if report["changed"]:
        assert report["chosen"] == report["best_point"] and report["gain"] >= report["min_gain"]
        assert "chosen: --factors-wd" in printed
    else:
        assert report["gain"] < report["min_gain"] and "kept the given settings: --factors-wd" in printed
        assert ("the best of the points tried" in printed) == (report["best_score"] <= report["given_score"])

    out = tmp_path / "out"
    assert main(["run", *columns, "--tune", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # The same carve and grid on the same data: the same winner, and it is what trained.
    assert metrics["tuning"]["chosen"] == report["chosen"]
    for name, value in report["chosen"].items():
        assert metrics["hyperparameters"][name] == value


def test_tuning_a_rating_regressor_is_refused_by_name(explicit_csv, tmp_path, capsys):
    code = main(["tune", "--interactions", str(explicit_csv), "--user-col", "customer", "--item-col", "sku",
                 "--rating-col", "stars", "--objective", "rating", *FAST])
    assert code == 2 and "tuning searches the icd learner's settings" in capsys.readouterr().err


def test_history_features_come_from_training_rows_only_and_the_run_serves_them(explicit_csv, tmp_path):
    from topx import evaluate as ev
    from topx.config import default_hyperparameters
    from topx.dataset import DataOptions, load_dataset, with_history
    from topx.feature_index import FeatureIndex

    data = DataOptions(str(explicit_csv), user_col="customer", item_col="sku", rating_col="stars")
    ds = load_dataset(data)
    hp = default_hyperparameters("ranking", history_features="both")
    holdout = ev.holdout_split(ds.user_rows, 0.2, hp.seed)
    trained = with_history(ds, ~holdout, hp)
    fi = trained.feature_index
    names = np.asarray(fi.names)
    user_hist = np.char.startswith(names.astype(str), "history:item_id=")
    item_hist = np.char.startswith(names.astype(str), "history:user_id=")
    assert user_hist.sum() == ds.feature_index.n_items and item_hist.sum() == ds.feature_index.n_users
    assert {fi.owners[j] for j in np.flatnonzero(user_hist)} == {"user"}
    assert {fi.owners[j] for j in np.flatnonzero(item_hist)} == {"item"}
    # A user's history holds exactly its training items, each 1 / sqrt(their count); no held-out item.
    for user in range(0, ds.feature_index.n_users, 37):
        row = fi.user_x[user, user_hist].toarray().ravel()
        own = ds.item_rows[(ds.user_rows == user) & ~holdout]
        assert set(np.flatnonzero(row)) == set(own)
        np.testing.assert_allclose(row[own], 1 / np.sqrt(len(set(own))), rtol=1e-6)
    assert isinstance(fi, FeatureIndex) and ds.feature_index.n_features < fi.n_features

    out = tmp_path / "out"
    assert main(["run", "--interactions", str(explicit_csv), "--user-col", "customer", "--item-col", "sku",
                 "--rating-col", "stars", "--history-features", "both", "--out", str(out), *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["hyperparameters"]["history_features"] == "both"
    assert metrics["data"]["n_features"] == fi.n_features
    assert metrics["recall_at_10"] > metrics["popularity_recall_at_10"]
    # The published model carries the history features: its index names them.
    saved = FeatureIndex.load(out / "model")
    assert saved.names == fi.names


def test_an_unknown_history_features_value_is_refused_by_name(explicit_csv, capsys):
    with pytest.raises(SystemExit):
        main(["run", "--interactions", str(explicit_csv), "--history-features", "all", "--out", "x"])
    assert "--history-features" in capsys.readouterr().err


@pytest.fixture(scope="module")
def timed_csv(tmp_path_factory) -> Path:
    """Interactions with a time column in ISO-8601, one day apart in a shuffled order."""
    frame = generate(200, 80, mean_interactions=12, implicit=False, seed=4).interactions
    days = np.random.default_rng(0).permutation(len(frame))
    frame["when"] = (pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(days, unit="D")).strftime(
        "%Y-%m-%dT%H:%M:%SZ")
    path = tmp_path_factory.mktemp("timed") / "timed.csv"
    frame.to_csv(path, index=False)
    return path


def test_with_a_time_column_the_holdout_is_each_users_latest_rows(timed_csv, tmp_path):
    out = tmp_path / "out"
    assert main(["run", "--interactions", str(timed_csv), "--time-col", "when", "--out", str(out), *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["holdout_split"] == "temporal"
    assert metrics["data"]["time_first"] == "2024-01-01T00:00:00Z"
    with np.load(out / "data" / "interactions.npz") as z:
        users, time, holdout = z["user_rows"], z["time"], z["holdout"]
    assert holdout.any()
    for user in np.unique(users[holdout]):
        mine = users == user
        assert time[mine & holdout].min() > time[mine & ~holdout].max()

    plain = tmp_path / "plain"
    assert main(["run", "--interactions", str(timed_csv), "--out", str(plain), *FAST]) == 0
    assert json.loads((plain / "metrics.json").read_text())["holdout_split"] == "random"


def test_since_drops_older_rows_and_half_life_weighs_recent_ones(timed_csv, tmp_path):
    from topx.dataset import DataOptions, load_dataset, user_recency
    from topx.steps import implicit_data

    out = tmp_path / "out"
    assert main(["run", "--interactions", str(timed_csv), "--time-col", "when", "--since", "2024-03-01",
                 "--half-life-days", "30", "--out", str(out), *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    frame = pd.read_csv(timed_csv)
    older = (pd.to_datetime(frame["when"]) < pd.Timestamp("2024-03-01", tz="UTC")).sum()
    assert metrics["data"]["rows_before_window_dropped"] == older > 0
    assert metrics["data"]["time_first"] >= "2024-03-01" and metrics["half_life_days"] == 30

    ds = load_dataset(DataOptions(str(timed_csv), time_col="when", implicit=True, half_life_days=30,
                                  recency_boost=0))
    weight = implicit_data(ds).weight
    expected = np.log1p(ds.rating) * 0.5 ** ((ds.time.max() - ds.time) / 86400 / 30)
    np.testing.assert_allclose(weight, expected / expected.mean(), rtol=1e-5)
    # The recency boost (on by default with a time column) multiplies in.
    boosted = load_dataset(DataOptions(str(timed_csv), time_col="when", implicit=True, half_life_days=30))
    assert boosted.recency_boost == DEFAULT_RECENCY_BOOST > 0
    expected = expected * user_recency(boosted.user_rows, boosted.time, DEFAULT_RECENCY_BOOST)
    np.testing.assert_allclose(implicit_data(boosted).weight, expected / expected.mean(), rtol=1e-5)
    days = load_dataset(DataOptions(str(timed_csv), time_col="when", implicit=True, since="10"))
    assert (days.time >= days.time.max() - 10 * 86400).all() and len(days.time) < len(ds.time)


def test_recency_and_window_without_a_time_column_are_refused_by_name(timed_csv, capsys):
    # The file has no column named timestamp (its time is "when"), and none was named.
    assert main(["run", "--interactions", str(timed_csv), "--half-life-days", "30", "--recency-boost", "2",
                 "--out", "x", *FAST]) == 2
    assert (f"topx: error: half_life_days (--half-life-days), recency_boost (--recency-boost) need a time column, "
            f"and {timed_csv} has no column 'timestamp': name the time column with time_col (--time-col)"
            ) in capsys.readouterr().err
    assert main(["run", "--interactions", str(timed_csv), "--no-time-col", "--since", "30", "--out", "x",
                 *FAST]) == 2
    assert "topx: error: --since: needs a time column (time_col)" in capsys.readouterr().err
    assert main(["run", "--interactions", str(timed_csv), "--no-time-col", "--time-col", "when", "--out", "x",
                 *FAST]) == 2
    assert "topx: error: --no-time-col: contradicts time_col: leave one of them out" in capsys.readouterr().err
    assert main(["run", "--interactions", str(timed_csv), "--time-col", "when", "--since", "last week",
                 "--out", "x", *FAST]) == 2
    assert "topx: error: --since: expected an ISO-8601 date (e.g. 2024-05-01) or a positive number of days, got " \
           "'last week'" in capsys.readouterr().err


def test_a_column_named_timestamp_is_the_time_column_by_default(timed_csv, tmp_path, capsys):
    frame = pd.read_csv(timed_csv)
    when = pd.to_datetime(frame.pop("when"))
    frame["timestamp"] = (when - pd.Timestamp("1970-01-01", tz="UTC")) // pd.Timedelta(seconds=1)  # epoch seconds
    path = tmp_path / "stamped.csv"
    frame.to_csv(path, index=False)

    found = tmp_path / "found"
    assert main(["run", "--interactions", str(path), "--out", str(found), *FAST[:-1]]) == 0
    err = capsys.readouterr().err
    assert "Time: column timestamp (read by default: --no-time-col leaves it unread), 2024-01-01T00:00:00Z to " in err
    assert (f"; the hold-out is each user's latest rows; each user's recent interactions weigh more, the latest "
            f"{1 + DEFAULT_RECENCY_BOOST:g} x the earliest (--recency-boost).") in err
    metrics = json.loads((found / "metrics.json").read_text())
    assert metrics["holdout_split"] == "temporal" and metrics["recency_boost"] == DEFAULT_RECENCY_BOOST
    assert metrics["data"]["time_first"] == "2024-01-01T00:00:00Z" and "unused_columns" not in metrics["data"]
    with np.load(found / "data" / "interactions.npz") as z:
        assert float(z["recency_boost"]) == DEFAULT_RECENCY_BOOST and len(z["time"]) == len(frame)

    ignored = tmp_path / "ignored"
    assert main(["run", "--interactions", str(path), "--no-time-col", "--out", str(ignored), *FAST]) == 0
    metrics = json.loads((ignored / "metrics.json").read_text())
    assert metrics["holdout_split"] == "random" and metrics["recency_boost"] == 0.0
    assert metrics["data"]["unused_columns"] == ["timestamp"]

    off = tmp_path / "off"
    assert main(["run", "--interactions", str(path), "--recency-boost", "0", "--out", str(off), *FAST]) == 0
    metrics = json.loads((off / "metrics.json").read_text())
    assert metrics["holdout_split"] == "temporal" and metrics["recency_boost"] == 0.0

    # The boost's default is for ranking, where it was measured; predicting ratings reads the time but no boost.
    rating = tmp_path / "rating"
    assert main(["run", "--interactions", str(path), "--objective", "rating", "--out", str(rating), *FAST]) == 0
    metrics = json.loads((rating / "metrics.json").read_text())
    assert metrics["holdout_split"] == "temporal" and metrics["recency_boost"] == 0.0

    # Without a column of that name, nothing is read as time and nothing is refused.
    plain = tmp_path / "plain"
    assert main(["run", "--interactions", str(timed_csv), "--out", str(plain), *FAST]) == 0
    metrics = json.loads((plain / "metrics.json").read_text())
    assert metrics["holdout_split"] == "random" and metrics["recency_boost"] == 0.0


def test_a_bad_default_time_column_names_the_row_and_the_way_to_leave_it_unread(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    for first, reason in (("1700000000", "time 'yesterday' is not epoch seconds or milliseconds, as the column's "
                                         "first values are"),
                          ("2023-11-14", "time 'yesterday' is not ISO-8601")):
        path.write_text(f"user_id,item_id,rating,timestamp\nu1,i1,5,{first}\nu1,i2,3,yesterday\nu2,i1,4,{first}\n")
        assert main(["run", "--interactions", str(path), "--out", str(tmp_path / "x"), *FAST]) == 2
        err = capsys.readouterr().err
        assert f"{path}, row 3, column 'timestamp': {reason}" in err
        assert "--no-time-col, or no_time_col in a dataset configuration, leaves it unread" in err
        assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def planted_cold(tmp_path_factory) -> dict[str, Path]:
    """Two tastes: users u0, u2, ... take items of category a, the others of category b; the items
    table also lists new-a and new-b (no interactions yet), the users table newbie-a and newbie-b."""
    rng = np.random.default_rng(7)
    rows = []
    for user in range(60):
        taste = "ab"[user % 2]
        for item in rng.choice(12, size=7, replace=False):
            rows.append((f"u{user}", f"{taste}{item}"))
    directory = tmp_path_factory.mktemp("cold")
    paths = {"interactions": directory / "plays.csv", "items": directory / "items.csv",
             "users": directory / "users.csv"}
    pd.DataFrame(rows, columns=["user_id", "item_id"]).to_csv(paths["interactions"], index=False)
    items = [(f"{c}{i}", c) for c in "ab" for i in range(12)] + [("new-a", "a"), ("new-b", "b")]
    pd.DataFrame(items, columns=["item_id", "category"]).to_csv(paths["items"], index=False)
    users = [(f"u{u}", "ab"[u % 2]) for u in range(60)] + [("newbie-a", "a"), ("newbie-b", "b")]
    pd.DataFrame(users, columns=["user_id", "taste"]).to_csv(paths["users"], index=False)
    return paths


def test_cold_items_and_users_are_recommended_from_their_features(planted_cold, tmp_path):
    out = tmp_path / "out"
    assert main(["run", "--interactions", str(planted_cold["interactions"]), "--items", str(planted_cold["items"]),
                 "--users", str(planted_cold["users"]), "--top-x", "5", "--epochs", "8", "--quiet",
                 "--out", str(out)]) == 0
    recs = read_recs(out)
    lists = {user: group.sort_values("rank")["item_id"].tolist() for user, group in recs.groupby("user_id")}
    a_users = [f"u{u}" for u in range(0, 60, 2)]
    # The new item of a user's own category reaches most of their lists; the other category's never does.
    assert sum("new-a" in lists[u] for u in a_users) >= 0.8 * len(a_users)
    assert not any("new-b" in lists[u] for u in a_users)
    # A new user with a taste is given that taste's items, and is marked as recommended from features.
    assert all(item.startswith(("a", "new-a")) for item in lists["newbie-a"])
    assert all(item.startswith(("b", "new-b")) for item in lists["newbie-b"])
    cold_flags = recs.groupby("user_id")["cold_user"].first()
    assert cold_flags[["newbie-a", "newbie-b"]].all() and not cold_flags.drop(["newbie-a", "newbie-b"]).any()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cold"]["items"] == 2 and metrics["cold"]["users"] == 2
    assert metrics["cold"]["cold_item_rows"] == recs["item_id"].isin(["new-a", "new-b"]).sum() > 0

    without = tmp_path / "without"
    assert main(["run", "--interactions", str(planted_cold["interactions"]), "--items", str(planted_cold["items"]),
                 "--users", str(planted_cold["users"]), "--no-cold-items", "--no-cold-users", "--quiet",
                 "--out", str(without)]) == 0
    plain = read_recs(without)
    assert not plain["item_id"].isin(["new-a", "new-b"]).any() and "newbie-a" not in set(plain["user_id"])


def test_run_on_a_spark_style_folder_export(tmp_path):
    """Parts under dt=... folders with _SUCCESS and .crc files beside them, warehouse column names."""
    data = generate(120, 60, mean_interactions=10, implicit=True, seed=5).interactions
    data = data.rename(columns={"user_id": "customer_id", "item_id": "product_id"})
    halves = np.array_split(np.arange(len(data)), 2)
    for day, rows in zip(("2024-05-01", "2024-05-02"), halves, strict=True):
        folder = tmp_path / "export" / f"dt={day}"
        folder.mkdir(parents=True)
        data.iloc[rows].to_parquet(folder / "part-00000.snappy.parquet")
        (folder / ".part-00000.snappy.parquet.crc").write_bytes(b"x")
    (tmp_path / "export" / "_SUCCESS").write_bytes(b"")
    out = tmp_path / "out"
    assert main(["run", "--interactions", str(tmp_path / "export"), "--user-col", "customer_id", "--item-col",
                 "product_id", "--rating-col", "plays", "--time-col", "dt", "--out", str(out), *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["rows_read"] == len(data) and metrics["holdout_split"] == "temporal"
    assert set(read_recs(out)["user_id"]) == set(data["customer_id"])


def test_the_summary_says_when_the_model_loses_to_popularity_and_what_else_the_run_wrote(implicit_files, tmp_path,
                                                                                          capsys):
    out = tmp_path / "out"
    assert main(["run", "--interactions", str(implicit_files["interactions"]), "--rating-col", "plays",
                 "--items", str(implicit_files["items"]), "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    loses = metrics["recall_at_10"] <= metrics["popularity_recall_at_10"]
    assert ("does not beat recommending the most popular items" in printed) == loses
    assert f"fallback list (for users the model has not seen): {metrics['fallback']['source']}" in printed
    assert "metrics (hold-out, random split):" in printed


def test_run_searches_by_default_at_its_sizes_and_never_with_no_tune_or_a_grid_setting(explicit_csv, tmp_path,
                                                                                      monkeypatch):
    import topx.tune

    columns = ["--interactions", str(explicit_csv), "--user-col", "customer", "--item-col", "sku",
               "--rating-col", "stars", *FAST]

    def tuning(*extra: str) -> dict | None:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        assert main(["run", *columns, *extra, "--out", str(out)]) == 0
        return json.loads((out / "metrics.json").read_text()).get("tuning")

    assert tuning() is None  # 3,600 training rows: under topx.tune.AUTO_MIN_ROWS
    monkeypatch.setattr(topx.tune, "AUTO_MIN_ROWS", 0)
    auto = tuning()
    assert auto["mode"] == "auto" and len(auto["trials"]) == 6  # topx.tune.AUTO_GRID
    assert tuning("--no-tune") is None and tuning("--unobserved-weight", "3") is None
    assert tuning("--tune", "--unobserved-weight", "3")["mode"] == "on"


def test_run_names_the_columns_it_did_not_read(tmp_path, capsys):
    data = generate(120, 60, mean_interactions=8, implicit=True, seed=4).interactions
    data["ts"] = np.arange(len(data)) + 1_700_000_000
    data.to_csv(tmp_path / "plays.csv", index=False)
    assert main(["run", "--interactions", str(tmp_path / "plays.csv"), "--out", str(tmp_path / "out"),
                 "--epochs", "2", "--num-factors", "4"]) == 0
    err = capsys.readouterr().err
    assert "Not read: columns plays, ts (--rating-col NAME weighs the interactions" in err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["data"]["unused_columns"] == ["plays", "ts"]

"""The ``topx`` command line.

Every user error (a ``TopxError``) is printed as one line on stderr with exit code 2 and no
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from topx import __version__
from topx.config import OBJECTIVES, HyperParameters, default_hyperparameters
from topx.contract import (
    DEFAULT_MAX_BYTES,
    DEFAULT_RECENCY_BOOST,
    DEFAULT_SEARCH_METHOD,
    DEFAULT_TIME_COL,
    DEFAULT_TOP_X,
    HISTORY_FEATURES,
    LEARNERS,
    RUN_MODE_REFRESH,
    SEARCH_METHODS,
)
from topx.errors import ConfigError, TopxError

EXIT_USER_ERROR = 2


def _column(value: str) -> str | int:
    """Column names are names; a bare number is a 0-based position (for --no-header files)."""
    return int(value) if value.isdigit() else value


def _add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", metavar="FILE",
                   help="a dataset configuration (JSON, docs/FORMATS.md): these options as fields named like them "
                        "(user_col, time_col, objective, ...), the same file a deployment reads; the options "
                        "given here override its fields")
    g.add_argument("--interactions", metavar="FILE|DIR",
                   help="interactions: a CSV, TSV or Parquet file (optionally .gz), or a folder of part files as "
                        "Spark, Glue and Athena export them (key=value partition folders become columns; "
                        "_SUCCESS and other markers are skipped); a local path or an s3:// URI or prefix. "
                        "Required unless --dataset names it")
    g.add_argument("--users", metavar="FILE", help="optional user feature table keyed by user id")
    g.add_argument("--items", metavar="FILE", help="optional item feature table keyed by item id")
    g.add_argument("--user-col", type=_column, metavar="COL",
                   help="user id column (default: user_id; 0 without a header)")
    g.add_argument("--item-col", type=_column, metavar="COL",
                   help="item id column (default: item_id; 1 without a header)")
    g.add_argument("--rating-col", type=_column, metavar="COL",
                   help="rating or strength column (default: rating; 2 without a header). For ranking it weighs "
                        "each interaction and may be absent (1 per row); --objective rating predicts it")
    g.add_argument("--user-key", type=_column, metavar="COL",
                   help="key column of the --users table (default: the --user-col name)")
    g.add_argument("--item-key", type=_column, metavar="COL",
                   help="key column of the --items table (default: the --item-col name)")
    g.add_argument("--no-cold-items", action="store_true", default=None,
                   help="leave out --items rows with no interactions (default: they are recommended from their "
                        "features alone, so new products get a chance)")
    g.add_argument("--no-cold-users", action="store_true", default=None,
                   help="leave out --users rows with no interactions (default: they get recommendations from "
                        "their features alone, marked cold_user)")
    g.add_argument("--no-header", action="store_true", default=None,
                   help="files have no header row: columns are given by 0-based position")
    g.add_argument("--sep", metavar="SEP", help=r"field separator (default: sniffed among , \t ; |)")
    g.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="ranking (default): every interaction is a positive, every other pair a negative, and "
                        "the model ranks what each user takes next; rating: a regressor that predicts the "
                        "rating column (SageMaker's regressor)")
    g.add_argument("--min-rating", type=float, metavar="R",
                   help="keep only rows rated >= R (as positives, for ranking); default: every row")
    g.add_argument("--time-col", type=_column, metavar="COL",
                   help="time of each interaction: epoch seconds or milliseconds, or ISO-8601 text (default: the "
                        f"column named {DEFAULT_TIME_COL}, when there is one). With it the hold-out is each user's "
                        "latest rows (what a batch recommender faces), not a random draw, and the recency boost "
                        "weighs each user's recent interactions more")
    g.add_argument("--no-time-col", action="store_true", default=None,
                   help=f"read no time column, not even one named {DEFAULT_TIME_COL}")
    g.add_argument("--half-life-days", type=float, metavar="DAYS",
                   help="with a time column: weigh each interaction by 0.5 ** (age / DAYS), age from the latest one "
                        "(default: no recency weighting)")
    g.add_argument("--recency-boost", type=float, metavar="B",
                   help="with a time column: within each user's interactions in time order, the latest weighs 1 + B "
                        "times the earliest, linearly between, each user's total unchanged (default "
                        f"{DEFAULT_RECENCY_BOOST:g} for ranking, 0 for --objective rating; 0 = off)")
    g.add_argument("--since", metavar="DATE|DAYS",
                   help="with a time column: drop interactions before DATE (ISO-8601), or older than DAYS days "
                        "before the latest one (default: keep all)")
    g.add_argument("--implicit", action="store_true",
                   help="the rating column is interaction strength (play counts, clicks): the same as "
                        "--objective ranking, the default")
    g.add_argument("--max-bytes", type=int, metavar="N",
                   help=f"refuse interactions whose parts hold more than N bytes together, as stored, before "
                        f"reading any (default {DEFAULT_MAX_BYTES:,}: a guard against exporting the wrong table)")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (names as SageMaker's factorization machines)")
    ranking, rating = default_hyperparameters("ranking"), default_hyperparameters("rating")
    sgd = default_hyperparameters("ranking", learner="sgd")

    def default(name: str) -> str:
        a, b = getattr(ranking, name), getattr(rating, name)
        return f"default {a}" if a == b else f"default {a}; {b} with --objective rating"

    g.add_argument("--num-factors", type=int, metavar="K", help=f"latent dimension k ({default('num_factors')})")
    g.add_argument("--epochs", type=int, help=f"maximum epochs ({default('epochs')}; early stopping may end sooner)")
    g.add_argument("--mini-batch-size", type=int, help=f"samples per step ({default('mini_batch_size')})")
    g.add_argument("--predictor-type", choices=("regressor", "binary_classifier"),
                   help="SageMaker's name for the objective: binary_classifier (ranking) or regressor (rating)")
    g.add_argument("--learner", choices=LEARNERS,
                   help="icd (default for ranking): coordinate descent over every unobserved pair; sgd: "
                        "mini-batch Adagrad with sampled negatives (ranking) or on the ratings (rating)")
    g.add_argument("--unobserved-weight", type=float, metavar="A",
                   help="icd: what all unobserved pairs weigh together, relative to the observed ones "
                        f"(default {ranking.unobserved_weight})")
    g.add_argument("--regularization-exponent", type=float, metavar="NU",
                   help="icd: weight decay scales with each feature's pairs to this power "
                        f"(default {ranking.regularization_exponent}; 0 = plain weight decay)")
    g.add_argument("--cg-steps", type=int, metavar="S",
                   help="icd: conjugate-gradient steps per update of the id features, 0 for the exact solve "
                        f"(default {ranking.cg_steps})")
    g.add_argument("--history-features", choices=HISTORY_FEATURES,
                   help="add each user's training items as user features (user), each item's users as item "
                        "features (item), both, or none (default none: on the validation carves measured in "
                        "docs/PERFORMANCE.md they did not pay for their cost)")
    for name in ("bias_lr", "linear_lr", "factors_lr", "bias_wd", "linear_wd", "factors_wd",
                 "bias_init_sigma", "linear_init_sigma", "factors_init_sigma"):
        g.add_argument(f"--{name.replace('_', '-')}", type=float, dest=name, help=default(name))
    g.add_argument("--negative-samples", type=int,
                   help=f"sgd ranking: negatives per positive (default {sgd.negative_samples})")
    g.add_argument("--seed", type=int, help=f"random seed for splits, initialisation and sampling ({default('seed')})")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda (default auto)")
    g.add_argument("--holdout", type=float, default=0.2,
                   help="per-user fraction of interactions held out for evaluation (default 0.2; 0 = none)")


def _add_ranking_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top-x", type=int, default=DEFAULT_TOP_X, metavar="X",
                   help=f"how many items to recommend per user (default {DEFAULT_TOP_X})")
    p.add_argument("--include-seen", action="store_true",
                   help="keep items the user already interacted with (default: exclude them)")
    p.add_argument("--search-method", choices=SEARCH_METHODS, default=DEFAULT_SEARCH_METHOD,
                   help="how the top-x is searched: exact = topx's bounded reduced-precision scan (default); "
                        "faiss = FAISS IndexFlatIP, exact in float32; hnsw, ivf = approximate FAISS indexes, "
                        "faster on very large catalogues (see docs/PERFORMANCE.md)")


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--relevance-threshold", type=float, metavar="R",
                   help="count a held-out item as relevant only when its rating is >= R (default: all)")
    p.add_argument("--eval-users", type=int, default=20000,
                   help="rank at most this many users (a seeded sample) for the ranking metrics (default 20000)")


def _add_stack_options(p: argparse.ArgumentParser, *, table: bool = False, bucket: bool = False,
                       state_machine: bool = False) -> None:
    g = p.add_argument_group("deployed stack")
    g.add_argument("--stack", metavar="NAME", help="CloudFormation stack whose outputs name the resources (default Topx)")
    if table:
        g.add_argument("--table", metavar="NAME", help="recommendations table (default: from the stack)")
    if bucket:
        g.add_argument("--bucket", metavar="NAME", help="data bucket (default: from the stack)")
    if state_machine:
        g.add_argument("--state-machine-arn", metavar="ARN", help="the pipeline (default: from the stack)")
    g.add_argument("--endpoint-url", metavar="URL",
                   help="AWS endpoint, e.g. moto server or LocalStack (default: $TOPX_ENDPOINT_URL, else AWS)")


# What `topx upload --as` puts where: data under incoming/, the filter file at config/filters.json, responses
# under responses/.
UPLOAD_KINDS = ("data", "filters", "responses")


class _Burst(argparse.Action):
    """``topx offline``'s --upload, --filters and --responses: each a burst (kind, path), kept in the order given."""

    KINDS = {"--upload": "data", "--filters": "filters", "--responses": "responses"}

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        bursts = list(getattr(namespace, self.dest, None) or [])
        bursts.append((self.KINDS[option_string or "--upload"], values))
        setattr(namespace, self.dest, bursts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="topx",
        description="Batch top-x recommendations: a factorization machine, repackaged into user and item "
                    "vectors, and exact inner-product search for every user.",
    )
    parser.add_argument("--version", action="version", version=f"topx {__version__}")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    # --quiet is accepted before or after the command name.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = sub.add_parser

    def add_command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return add(name, parents=[common], **kwargs)

    p = add_command("run", help="all stages: ingest, train, vectors, recommend, evaluate",
                       description="Run every stage and write the outputs into --out, replacing it only on success.")
    _add_data_options(p)
    _add_model_options(p)
    _add_ranking_options(p)
    _add_eval_options(p)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory: recommendations.parquet, model/, vectors/, metrics.json")
    tuning = p.add_mutually_exclusive_group()
    tuning.add_argument("--tune", action="store_const", const="on", dest="tune",
                        help="first search the ranking learner's weight decay and unobserved weight on a validation "
                             "carve of the training rows (as `topx tune`), then train with the winner if it gains "
                             "3%% there; by default a smaller search (--unobserved-weight x --linear-wd) runs on "
                             "5,000 to 2,000,000 training rows unless you set --factors-wd, --unobserved-weight or "
                             "--linear-wd")
    tuning.add_argument("--no-tune", action="store_const", const="off", dest="tune",
                        help="never search: train with the defaults and the settings given")
    p.add_argument("--filters", metavar="FILE",
                   help="a filter file (JSON, docs/FORMATS.md): which items may be recommended, by the --items "
                        "table's columns and by id; checked before training, applied exactly by the search")
    p.add_argument("--responses", metavar="FILE",
                   help="(user_id, item_id) pairs to leave out of each user's list, as seen items are: items "
                        "dismissed, bought elsewhere, already sent")

    p = add_command("tune", help="search the ranking learner's settings on a validation carve of your data",
                       description="Carve a seeded 20%% of each user's training rows (the --holdout rows stay "
                                   "unseen), train every point of a small grid of --factors-wd and "
                                   "--unobserved-weight on the rest, and report each point's recall@x on the "
                                   "carve, the best point, and its gain over the given settings; it is chosen "
                                   "when the gain is 3%% or more, else the given settings stay.")
    _add_data_options(p)
    _add_model_options(p)
    _add_ranking_options(p)
    _add_eval_options(p)

    p = add_command("train", help="ingest and train; writes model/ and data/ into --out",
                       description="Read and validate the data, train the FM, write the model artifact "
                                   "(SageMaker FM layout) and the feature index. --interactions may also be "
                                   "SageMaker's recordIO-protobuf training data (detected by its magic number).")
    _add_data_options(p)
    _add_model_options(p)
    p.add_argument("--feature-index", metavar="PATH",
                   help="with recordIO-protobuf input: the feature index of its columns, kept beside the model")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory to create (replaced only on success)")

    p = add_command("vectors", help="repackage a model into the recipe's user and item vectors",
                       description="From a run directory (--run), or from any SageMaker FM model.tar.gz "
                                   "(--model) with its feature index, write a_u, a_i and c_u.")
    p.add_argument("--run", metavar="DIR", help="run directory written by `topx train` (writes DIR/vectors)")
    p.add_argument("--model", metavar="PATH", help="model.tar.gz (or a directory holding it)")
    p.add_argument("--feature-index", metavar="PATH",
                   help="feature index (feature_index.json or its directory); default: beside --model")
    p.add_argument("--one-hot-users", metavar="FILE",
                   help="instead of --feature-index: a file of user ids, one per line, for a model whose rows are "
                        "the users' one-hot then the items' (as SageMaker examples build it)")
    p.add_argument("--one-hot-items", metavar="FILE", help="the item ids, one per line, with --one-hot-users")
    p.add_argument("--out", metavar="DIR", help="where to write the vectors (default: RUN/vectors)")

    p = add_command("recommend", aliases=["refresh"],
                       help="top-x for every user from the vectors (exact by default); `refresh` is the same command",
                       description="Search the top-x items of every user by inner product and write "
                                   "recommendations.parquet (and lists/<name>.parquet for the filter file's named "
                                   "lists). With --filters and --responses it refreshes a run's lists for new rules "
                                   "and new responses without retraining (`topx refresh`).")
    p.add_argument("--run", required=True, metavar="DIR", help="run directory holding vectors/ (and data/ for seen items)")
    _add_ranking_options(p)
    p.add_argument("--filters", metavar="FILE", help="a filter file (JSON): which items may be recommended")
    p.add_argument("--responses", metavar="FILE",
                   help="(user_id, item_id) pairs to leave out of each user's list: re-applied without retraining")
    p.add_argument("--items", metavar="FILE", help="the items table the filter rules read (keyed by --item-key)")
    p.add_argument("--item-key", type=_column, metavar="COL",
                   help="key column of the --items table (default: the item id column, item_id)")
    p.add_argument("--dataset", metavar="FILE",
                   help="a dataset configuration (JSON): its items, item_key and item_col, under --items and "
                        "--item-key")

    p = add_command("evaluate", help="hold-out metrics of a run against a popularity baseline",
                       description="RMSE (regressor) or AUC and log loss (classifier), and recall, NDCG, MAP and "
                                   "coverage at x, beside popularity; writes metrics.json.")
    p.add_argument("--run", required=True, metavar="DIR", help="run directory written by `topx train` and `topx vectors`")
    p.add_argument("--top-x", type=int, default=DEFAULT_TOP_X, metavar="X", help=f"x of the ranking metrics (default {DEFAULT_TOP_X})")
    _add_eval_options(p)

    p = add_command("demo", help="the deployed pipeline, offline: S3 upload -> state machine -> DynamoDB",
                       description="Generate a synthetic catalogue (power-law popularity, user and item features, "
                                   "planted tastes), start moto in this process, deploy the stack's resources and the "
                                   "state machine from statemachine/pipeline.asl.json into it, upload the data under "
                                   "incoming/, follow the execution state by state, and read recommendations back "
                                   "from DynamoDB. TOPX_EPOCHS and TOPX_NUM_FACTORS set the model size. With "
                                   "--no-aws-stand-ins, run the same stages as plain functions instead, as `topx run` "
                                   "does. The AWS stand-ins need the offline extra: pip install 'topx[offline]'.")
    p.add_argument("--no-aws-stand-ins", dest="aws_stand_ins", action="store_false",
                   help="run the stages as plain functions, as `topx run` does, without the offline AWS stand-ins "
                        "(no S3, state machine or DynamoDB; moto not needed), and write the outputs of `topx run`")
    # The old name of --no-aws-stand-ins: hidden, and refused with a message that names the new one.
    p.add_argument("--local", dest="renamed_local", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", metavar="DIR",
                   help="keep the outputs here: the run's objects (runs/<run_id>/), or with --no-aws-stand-ins the "
                        "outputs of `topx run` (default: not kept)")
    p.add_argument("--users", type=int, default=3000, dest="n_users", help="number of users (default 3000)")
    p.add_argument("--items", type=int, default=1500, dest="n_items", help="number of items (default 1500)")
    p.add_argument("--explicit", action="store_true", help="generate 1-5 ratings instead of play counts")
    p.add_argument("--top-x", type=int, default=DEFAULT_TOP_X, metavar="X", help=f"default {DEFAULT_TOP_X}")
    p.add_argument("--seed", type=int, default=7, help="seed of the generated data (default 7)")

    p = add_command("offline", help="try the deployed pipeline on your own export before deploying",
                       description="Start the offline AWS stand-ins in this process, deploy the stack's resources and "
                                   "the state machine into them, and upload each burst in the order given: --upload "
                                   "PATH (a file, or a folder of part files) under incoming/, --filters FILE to "
                                   "config/filters.json, --responses PATH under responses/. The upload queue's "
                                   "starter starts a run for each, after the one before has ended, as on AWS: a "
                                   "full run for data, a refresh of the live model's lists for filters or responses "
                                   "alone. Progress goes to stderr; the last line of stdout is one JSON object: "
                                   "{\"executions\": [{\"status\", \"mode\", \"uploads\"}, ...], "
                                   "\"users_published\": N}. TOPX_EPOCHS, "
                                   "TOPX_NUM_FACTORS and the other TOPX_* deploy settings apply. Needs the offline "
                                   "extra: pip install 'topx[offline]'.")
    p.add_argument("--upload", action=_Burst, dest="bursts", metavar="PATH",
                   help="a file or a folder of data to upload under incoming/ as one burst (repeat for later "
                        "bursts, in order)")
    p.add_argument("--filters", action=_Burst, dest="bursts", metavar="FILE",
                   help="a filter file to upload to config/filters.json as one burst, in order with the others: "
                        "after a published run, a refresh")
    p.add_argument("--responses", action=_Burst, dest="bursts", metavar="PATH",
                   help="a responses table (or folder) to upload under responses/ as one burst, in order with the "
                        "others: after a published run, a refresh")
    p.add_argument("--dataset", metavar="FILE",
                   help="the dataset configuration (JSON) to deploy with, as CDK context dataset takes it: "
                        "column names, objective, time column and window")
    p.add_argument("--snapshot", metavar="LABEL",
                   help="upload the first --upload PATH as a snapshot (incoming/snapshot=LABEL/), the others on top "
                        "of it")

    p = add_command("recs", help="a user's live recommendations, read from a deployed stack's table",
                       description="Follow the active-version pointer in DynamoDB and print the user's top-x, "
                                   "best first. The table is --table, else the --stack's TableName output, else "
                                   "$TOPX_TABLE, else the output of the stack Topx.")
    p.add_argument("user_id", metavar="USER_ID", help="the user's id, as in the uploaded data")
    _add_stack_options(p, table=True)
    p.add_argument("--list", metavar="NAME", dest="list_name",
                   help="a named list of the filter file (its \"lists\") instead of the default list")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    p = add_command("upload", help="put a data file or an export folder under incoming/ of a deployed stack (starts a run)",
                       description="Upload interactions (CSV, TSV or Parquet, optionally gzipped; one file, or a "
                                   "folder of part files as warehouses export them, relative paths kept and markers "
                                   "such as _SUCCESS last) under incoming/ of the stack's bucket. Uploads add to "
                                   "the history (under the latest snapshot folder when there is one); --snapshot "
                                   "starts a new one. The upload queue's starter starts one run for the burst, "
                                   "after the run in progress if there is one, on all the data. The bucket is "
                                   "--bucket, else the --stack's BucketName output, else $TOPX_BUCKET, else the "
                                   "output of the stack Topx.")
    p.add_argument("file", metavar="PATH", help="local file or folder to upload")
    p.add_argument("--as", dest="kind", choices=UPLOAD_KINDS, default="data",
                   help="data (the default: under incoming/, a run trains on it); filters (the filter file, checked "
                        "first, to config/filters.json); responses (a (user_id, item_id) table or a folder of them, "
                        "under responses/). Filters or responses alone start a refresh: the live model's lists "
                        "made again under them, without training")
    p.add_argument("--implicit", action="store_true",
                   help="the rating column is interaction strength (metadata topx-mode: implicit); for ranking")
    p.add_argument("--objective", choices=OBJECTIVES,
                   help="ranking (the default for unmarked uploads) or rating (metadata topx-mode: rating)")
    p.add_argument("--key", metavar="NAME", help="object (or folder) name under incoming/ (default: the file's "
                                                 "or folder's name)")
    p.add_argument("--snapshot", metavar="LABEL",
                   help="replace the history: upload under incoming/snapshot=LABEL/ (an ISO date, say); runs read "
                        "only the latest snapshot from then on, and nothing older is deleted")
    _add_stack_options(p, bucket=True)

    p = add_command("report", help="the run report: one HTML page of a run's data, training, metrics and lists",
                       description="Write report.html into a run directory of `topx run` again (RUN_DIR), or fetch "
                                   "a deployed run's report from the stack's bucket (--run-id), and open it in the "
                                   "browser. `topx run` and the deployed pipeline write it anyway.")
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a run directory written by `topx run`")
    p.add_argument("--run-id", metavar="ID", help="a deployed run (its id, as `topx status` and the notifications "
                                                  "name it): fetch runs/ID/report.html from the stack's bucket")
    p.add_argument("--items", metavar="FILE",
                   help="with RUN_DIR: the items table, for titles (default: the one the run read, keyed by its "
                        "first column)")
    p.add_argument("--item-key", type=_column, metavar="COL", help="key column of --items (default: its first column)")
    p.add_argument("--out", metavar="FILE", help="with --run-id: where to save it (default: ./report-ID.html)")
    p.add_argument("--no-open", dest="open", action="store_false", help="do not open it in the browser")
    _add_stack_options(p, bucket=True)

    p = add_command("rollback", help="point readers back at an earlier version of a deployed stack",
                       description="Move the active-version pointer back to an earlier version that is still "
                                   "complete (every shard's items kept, its fallback list there, nothing of it "
                                   "expiring within a day): --to VERSION, or the newest one older than the live "
                                   "version. A run publishing at the same moment either goes live first, and the "
                                   "rollback changes nothing, or after it. The version rolled back from is retired by "
                                   "the next run's load, and the next run newer than it publishes as usual. Needs the "
                                   "table and the bucket: --table/--bucket, else the --stack's outputs, else "
                                   "$TOPX_TABLE/$TOPX_BUCKET, else the outputs of the stack Topx.")
    p.add_argument("--to", metavar="VERSION",
                   help="the version to make live (a run id that was live once, as `topx status` names it; default: "
                        "the newest complete version older than the live one)")
    _add_stack_options(p, table=True, bucket=True)

    p = add_command("status", help="the pipeline's latest executions, the uploads each covers, and the live version",
                       description="List the state machine's most recent executions, newest first, with the "
                                   "uploads the starter started each for, and the version readers currently see.")
    p.add_argument("--limit", type=int, default=10, help="how many executions (default 10)")
    _add_stack_options(p, table=True, state_machine=True)
    return parser


def _hyperparameters(args: argparse.Namespace, implicit: bool) -> HyperParameters:
    names = ("num_factors", "epochs", "mini_batch_size", "predictor_type", "bias_lr", "linear_lr", "factors_lr",
             "bias_wd", "linear_wd", "factors_wd", "bias_init_sigma", "linear_init_sigma", "factors_init_sigma",
             "negative_samples", "seed", "learner", "unobserved_weight", "regularization_exponent",
             "cg_steps", "history_features")
    return default_hyperparameters("ranking" if implicit else "rating", **{n: getattr(args, n, None) for n in names})


def _objective(args: argparse.Namespace) -> str | None:
    """--objective, with --implicit and --predictor-type as the older ways of saying it; None when none
    of them is given."""
    chosen = getattr(args, "objective", None)
    if getattr(args, "implicit", False):
        if chosen == "rating":
            raise ConfigError("--implicit reads the rating column as strength for ranking; it cannot go with "
                              "--objective rating")
        chosen = "ranking"
    predictor = getattr(args, "predictor_type", None)
    implied = {"regressor": "rating", "binary_classifier": "ranking"}.get(predictor or "")
    if chosen is not None and implied is not None and implied != chosen:
        raise ConfigError(f"--predictor-type {predictor} trains for {implied}, not --objective {chosen}")
    return chosen or implied


def _dataset_config(args: argparse.Namespace) -> dict[str, Any]:
    """The --dataset file's fields, overridden by the data options given on the command line (each field is
    the option of the same name); checked by the one rule the deployment checks with too."""
    from topx.contract import DATASET_FIELDS, DatasetConfigError, check_dataset_config, merge_dataset_configs
    from topx.dataset import read_dataset_config

    from_file = read_dataset_config(args.dataset) if getattr(args, "dataset", None) else {}
    given = {name: getattr(args, name) for name in DATASET_FIELDS if getattr(args, name, None) is not None}
    if _objective(args) is not None:
        given["objective"] = _objective(args)
    try:
        flags = check_dataset_config(given, together=False)
        return merge_dataset_configs(from_file, flags)
    except DatasetConfigError as exc:
        if from_file and exc.field not in given:
            raise ConfigError(f"{args.dataset} with the options given: {exc}") from exc
        raise ConfigError(f"--{str(exc.field).replace('_', '-')}: {exc.reason}") from exc


def _data_options(args: argparse.Namespace):
    from topx.dataset import data_options

    return data_options(_dataset_config(args))


def _run_options(args: argparse.Namespace):
    from topx.steps import RunOptions

    return RunOptions(
        top_x=getattr(args, "top_x", DEFAULT_TOP_X),
        holdout=getattr(args, "holdout", 0.2),
        include_seen=getattr(args, "include_seen", False),
        device=getattr(args, "device", None),
        relevance_threshold=getattr(args, "relevance_threshold", None),
        eval_users=getattr(args, "eval_users", 20000),
        progress=False if args.quiet else None,
        search_method=getattr(args, "search_method", DEFAULT_SEARCH_METHOD),
        tune=_tune_mode(args),
        filters=getattr(args, "filters", None),
        responses=getattr(args, "responses", None),
    )


def _tune_mode(args: argparse.Namespace) -> str:
    """--tune ("on"), --no-tune ("off"), or "auto", which is "off" when a setting of the search's grid was given."""
    from topx.tune import TUNE_GRID, tune_mode

    given = [name for name in TUNE_GRID if getattr(args, name, None) is not None]
    return tune_mode(getattr(args, "tune", None) or "auto", given)


def _print_metrics(metrics: dict[str, Any], x: int) -> None:
    keys = ["rmse", "rmse_global_mean", "auc", "log_loss", f"recall_at_{x}", f"ndcg_at_{x}", f"map_at_{x}",
            f"coverage_at_{x}", f"popularity_recall_at_{x}", f"popularity_ndcg_at_{x}", f"popularity_map_at_{x}",
            f"popularity_coverage_at_{x}"]
    shown = {k: metrics[k] for k in keys if k in metrics}
    if not shown:
        print(f"metrics: {metrics.get('note', 'none')}")
        return
    width = max(len(k) for k in shown) if shown else 0
    print(f"metrics (hold-out, {metrics.get('holdout_split', 'random')} split):")
    for k, v in shown.items():
        print(f"  {k:<{width}}  {v:.4f}")
    recall, popular = metrics.get(f"recall_at_{x}"), metrics.get(f"popularity_recall_at_{x}")
    if metrics.get("objective") == "ranking" and recall is not None and popular is not None and recall <= popular:
        print(f"note: the model's recall@{x} does not beat recommending the most popular items on this data "
              f"(the deployed quality gate would refuse it); try --tune, or more interactions per user")
    cold = metrics.get("cold") or {}
    if cold.get("items") or cold.get("users"):
        print(f"cold (no interactions, scored from features): {cold.get('items', 0)} item(s), "
              f"{cold.get('users', 0)} user(s); cold items fill {cold.get('cold_item_share', 0):.1%} of the lists")
    if "filters" in metrics:
        print(f"filters: {metrics['filters']['eligible_items']:,} item(s) eligible")
    if "fallback" in metrics:
        print(f"fallback list (for users the model has not seen): {metrics['fallback']['source']}, in fallback.parquet")


def cmd_run(args: argparse.Namespace) -> int:
    from topx.run import run_all
    from topx.steps import Reporter

    if args.filters is not None:
        from topx.filters import load_filters

        load_filters(args.filters)  # its structure is checked before anything is read
    data = _data_options(args)
    metrics = run_all(data, _hyperparameters(args, data.implicit), _run_options(args), args.out,
                      reporter=Reporter(not args.quiet))
    _print_metrics(metrics, args.top_x)
    print(f"wrote {Path(args.out).resolve()}")
    print(f"report: {(Path(args.out) / 'report.html').resolve()} (open it in a browser)")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from topx.dataset import load_dataset
    from topx.steps import Reporter, tuned_hyperparameters
    from topx.tune import outcome

    data = _data_options(args)
    hp = _hyperparameters(args, data.implicit)
    reporter = Reporter(not args.quiet)
    with reporter.step("ingest", f"reading {data.interactions}"):
        ds = load_dataset(data)
    _, report = tuned_hyperparameters(ds, hp, dataclasses.replace(_run_options(args), tune="on"), reporter)
    print(json.dumps(report, indent=2))
    flags = " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in report["chosen"].items())
    ended = outcome(report)
    if ended == "changed":
        print(f"chosen: {flags} ({report['metric']} {report['best_score']:.4f} on the validation carve, "
              f"{report['gain']:+.1%} over the given settings); `topx run --tune` tunes and trains in one go")
    elif ended == "given_best":
        print(f"kept the given settings: {flags} ({report['metric']} {report['given_score']:.4f} on the validation "
              f"carve, the best of the points tried)")
    else:
        best = " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in report["best_point"].items())
        print(f"kept the given settings: {flags} ({report['metric']} {report['given_score']:.4f} on the validation "
              f"carve); the best point, {best}, gained {report['gain']:+.1%}, under the {report['min_gain']:.0%} "
              f"a change needs, which one training's seed can move")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from topx.dataset import load_dataset
    from topx.io import read_bytes
    from topx.rundir import atomic_output_dir, write_json
    from topx.steps import Reporter, train_stage, training_summary

    if args.interactions is None:
        args.interactions = _data_options(args).interactions  # named by --dataset
    if _starts_like_recordio(args.interactions):
        return _train_recordio(args, read_bytes(args.interactions))
    data = _data_options(args)
    hp = _hyperparameters(args, data.implicit)
    reporter = Reporter(not args.quiet)
    with atomic_output_dir(Path(args.out)) as tmp:
        with reporter.step("ingest", f"reading {data.interactions}"):
            ds = load_dataset(data)
        _, holdout, result, ds = train_stage(ds, hp, _run_options(args), tmp, reporter)
        write_json(tmp / "metrics.json", {**training_summary(hp, result, ds.report),
                                          "holdout_fraction": args.holdout, "holdout_split": ds.split,
                                          "timings_s": reporter.timings})
    print(f"wrote {Path(args.out).resolve()}")
    return 0


def _starts_like_recordio(source: str) -> bool:
    """Peek at a local file's first bytes (S3 objects are read whole later anyway)."""
    from topx.formats.recordio import is_recordio_protobuf
    from topx.io import read_bytes

    if source.startswith("s3://"):
        return is_recordio_protobuf(read_bytes(source))
    try:
        with open(source, "rb") as fh:
            return is_recordio_protobuf(fh.read(4))
    except OSError:
        return False  # the reader reports a missing or unreadable file with its own clear error


def _train_recordio(args: argparse.Namespace, raw: bytes) -> int:
    """SageMaker's recordIO-protobuf training data: rows of x with labels, trained as given."""
    from topx.feature_index import FeatureIndex
    from topx.formats.recordio import read_recordio_protobuf
    from topx.rundir import atomic_output_dir, write_json
    from topx.steps import Reporter, train_rows_stage, training_summary

    hp = _hyperparameters(args, implicit=False)
    reporter = Reporter(not args.quiet)
    with reporter.step("ingest", f"reading recordIO-protobuf {args.interactions}"):
        stream = io.BytesIO(raw)
        stream.name = args.interactions  # errors name the file, not "<bytes>"
        x, y = read_recordio_protobuf(stream)
    feature_index = None
    if args.feature_index:
        location = Path(args.feature_index)
        feature_index = FeatureIndex.load(location.parent if location.suffix == ".json" else location)
    with atomic_output_dir(Path(args.out)) as tmp:
        result = train_rows_stage(x, y, hp, _run_options(args), tmp, reporter, source=args.interactions,
                                  feature_index=feature_index)
        data = {"rows": int(x.shape[0]), "n_features": int(x.shape[1]), "format": "recordio-protobuf"}
        write_json(tmp / "metrics.json", {**training_summary(hp, result, data), "timings_s": reporter.timings})
    print(f"wrote {Path(args.out).resolve()}")
    return 0


def cmd_vectors(args: argparse.Namespace) -> int:
    from topx.feature_index import FeatureIndex
    from topx.rundir import MODEL_DIR, VECTORS_DIR, read_model
    from topx.steps import vectors_stage

    if bool(args.run) == bool(args.model):
        raise ConfigError("give exactly one of --run DIR or --model PATH")
    if args.run:
        params, feature_index = read_model(Path(args.run) / MODEL_DIR)
        out = Path(args.out) if args.out else Path(args.run) / VECTORS_DIR
    else:
        from topx.formats.artifact import read_model_artifact

        if not args.out:
            raise ConfigError("--out is required with --model")
        params = read_model_artifact(args.model)
        feature_index = _external_feature_index(args, FeatureIndex)
        out = Path(args.out)
    vectors = vectors_stage(params, feature_index, out)
    print(f"wrote {vectors.user_vectors.shape[0]:,} user and {vectors.item_vectors.shape[0]:,} item vectors "
          f"(d = {vectors.item_vectors.shape[1]}) to {out.resolve()}")
    return 0


def _external_feature_index(args: argparse.Namespace, feature_index_cls):
    from topx.errors import ConfigError, InputDataError

    if args.one_hot_users or args.one_hot_items:
        if not (args.one_hot_users and args.one_hot_items):
            raise ConfigError("--one-hot-users and --one-hot-items go together")
        ids = []
        for path in (args.one_hot_users, args.one_hot_items):
            try:
                lines = Path(path).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise InputDataError(f"cannot read the id list: {exc}", source=path) from exc
            ids.append([line.strip() for line in lines if line.strip()])
        return feature_index_cls.one_hot(ids[0], ids[1])
    location = Path(args.feature_index) if args.feature_index else Path(args.model)
    if location.is_file() and location.suffix != ".json":
        location = location.parent
    return feature_index_cls.load(location)


def cmd_recommend(args: argparse.Namespace) -> int:
    import numpy as np
    import pyarrow.parquet as pq

    from topx.feature_index import FeatureIndex
    from topx.rundir import (
        DATA_DIR,
        FALLBACK,
        INTERACTIONS_FILE,
        METRICS,
        MODEL_DIR,
        RECOMMENDATIONS,
        VECTORS_DIR,
        list_fallback,
        list_recommendations,
        load_ids,
        load_interactions,
    )
    from topx.steps import fallback_list, write_recommendations_parquet
    from topx.vectors import RecipeVectors

    run = Path(args.run)
    vectors = RecipeVectors.load(run / VECTORS_DIR)
    user_ids, item_ids = load_ids(run / VECTORS_DIR)
    seen, cold_users_from, prepared = None, None, None
    if (run / MODEL_DIR).exists():
        index = FeatureIndex.load(run / MODEL_DIR)
        cold_users_from = index.n_warm_users
        if (run / DATA_DIR / INTERACTIONS_FILE).exists():
            prepared = load_interactions(run, index)
            if not args.include_seen:
                seen = prepared[0].matrix()
    # The fallback lists follow the new rules too, by the source the run's validation chose (metrics.json).
    source = None
    if prepared is not None and (run / METRICS).exists():
        source = json.loads((run / METRICS).read_text(encoding="utf-8")).get("fallback", {}).get("source")
    if args.responses is not None:
        from topx.filters import exclude_also, read_responses

        dismissed = read_responses(args.responses, list(user_ids), list(item_ids))
        seen = exclude_also(seen, dismissed)
    eligible = diversity = None
    named = []
    if args.filters is not None:
        from topx.filters import load_filters, resolve_lists
        from topx.ingest import read_feature_table

        from_file = {}
        if args.dataset is not None:
            from topx.dataset import read_dataset_config

            from_file = read_dataset_config(args.dataset)
        items = args.items if args.items is not None else from_file.get("items")
        # The items table's key: as given, else the dataset's item_key, else its item id column.
        item_key = next(k for k in (args.item_key, from_file.get("item_key"), from_file.get("item_col"), "item_id")
                        if k is not None)
        table = None if items is None else read_feature_table(items, key_col=item_key)
        default, *named = resolve_lists(load_filters(args.filters), list(item_ids), table)
        eligible, diversity = default.eligible, default.diversity
    # Each list is written beside its final name and moved there only when every list is written.
    written = []
    for name, chosen_eligible, chosen_diversity in ((None, eligible, diversity),
                                                    *((c.name, c.eligible, c.diversity) for c in named)):
        final = run / RECOMMENDATIONS if name is None else list_recommendations(run, name)
        final.parent.mkdir(exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp")
        n = write_recommendations_parquet(tmp, vectors, np.asarray(user_ids, object), np.asarray(item_ids, object),
                                          args.top_x, seen, method=args.search_method,
                                          cold_users_from=cold_users_from, eligible=chosen_eligible,
                                          diversity=chosen_diversity)
        written.append((tmp, final, n))
        if source is not None:
            fallback, _ = fallback_list(prepared[0], vectors, prepared[1], args.top_x, chosen_eligible,
                                        chosen_diversity, source=source)
            final = run / FALLBACK if name is None else list_fallback(run, name)
            tmp = final.with_name(f".{final.name}.tmp")
            pq.write_table(fallback, tmp)
            written.append((tmp, final, None))
    for tmp, final, n in written:
        tmp.replace(final)
        print(f"wrote {n:,} recommendations to {final.resolve()}" if n is not None else
              f"wrote the fallback list to {final.resolve()}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from topx.rundir import METRICS, MODEL_DIR, VECTORS_DIR, load_interactions, read_model, write_json
    from topx.steps import evaluate_model
    from topx.vectors import RecipeVectors

    run = Path(args.run)
    params, feature_index = read_model(run / MODEL_DIR)
    vectors = RecipeVectors.load(run / VECTORS_DIR)
    ds, holdout = load_interactions(run, feature_index)
    existing: dict[str, Any] = {}
    if (run / METRICS).exists():
        existing = json.loads((run / METRICS).read_text(encoding="utf-8"))
    trained = existing.get("hyperparameters", {})
    seed = trained.get("seed", HyperParameters().seed)
    options = dataclasses.replace(_run_options(args), top_x=args.top_x)
    metrics = evaluate_model(params, vectors, ds, holdout, options, seed, trained.get("learner", "sgd"))
    existing.update(metrics)
    write_json(run / METRICS, existing)
    _print_metrics(metrics, args.top_x)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.renamed_local:
        raise ConfigError("`topx demo --local` is now `topx demo --no-aws-stand-ins`: the same stages as plain "
                          "functions, without the offline AWS stand-ins")
    from topx.offline.demo import run_demo

    return run_demo(out=args.out, n_users=args.n_users, n_items=args.n_items, implicit=not args.explicit,
                    top_x=args.top_x, seed=args.seed, quiet=args.quiet, aws_stand_ins=args.aws_stand_ins)


def cmd_report(args: argparse.Namespace) -> int:
    if bool(args.run_dir) == bool(args.run_id):
        raise ConfigError("give a run directory (RUN_DIR) or a deployed run (--run-id ID), one of them")
    if args.run_id:
        from topx.aws import client

        path = client.fetch_report(args.run_id, args.out or f"report-{args.run_id}.html", bucket=args.bucket,
                                   stack=args.stack, endpoint_url=args.endpoint_url)
    else:
        from topx.report import write_run_report

        path = write_run_report(args.run_dir, items_table=_report_items(args))
    print(f"report: {path.resolve()}")
    if args.open:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())
    return 0


def _report_items(args: argparse.Namespace):
    """The items table for the report's titles: --items, else the one the run read (metrics.json names it)."""
    from topx.ingest import read_feature_table
    from topx.rundir import METRICS

    source = args.items
    if source is None:
        try:
            metrics = json.loads((Path(args.run_dir) / METRICS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # write_run_report names the missing or damaged file
        source = ((metrics.get("data") or {}).get("items_features") or {}).get("source")
        if source is None or not (source.startswith("s3://") or Path(source).exists()):
            return None
    return read_feature_table(source, key_col=0 if args.item_key is None else args.item_key)


def cmd_recs(args: argparse.Namespace) -> int:
    from topx.aws import client

    table = client.resolve_table(args.table, stack=args.stack, endpoint_url=args.endpoint_url)
    rec = client.get_recommendations(args.user_id, list_name=args.list_name, table=table,
                                     endpoint_url=args.endpoint_url)
    if args.json:
        print(json.dumps({"user_id": args.user_id, "list": args.list_name, "items": rec.items if rec else [],
                          "scores": rec.scores if rec else [], "fallback": bool(rec and rec.fallback),
                          "cold_user": bool(rec and rec.cold_user)}))
        return 0 if rec else 1
    if rec is None:
        print(f"no recommendations for {args.user_id!r} in {table} (nothing published yet)")
        return 1
    where = table if args.list_name is None else f"{table}, list {args.list_name}"
    if rec.fallback:
        print(f"fallback list for {args.user_id} ({where}): the live version has no list of this user's own, "
              "so this is its list for users it has not seen:")
    else:
        cold = " (from their features: no interactions yet)" if rec.cold_user else ""
        print(f"recommendations for {args.user_id} ({where}){cold}:")
    if not rec.items:
        print("  (none: " + ("no item of the fallback list is one this list may recommend" if rec.fallback
                             else "the user has already had every item this list may recommend") + ")")
    for rank, (item, score) in enumerate(zip(rec.items, rec.scores, strict=True), start=1):
        print(f"  {rank:>3}. {item}  {score:+.4f}")
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    from topx.aws import client

    if args.kind != "data":
        given = [flag for flag, value in (("--implicit", args.implicit), ("--objective", args.objective),
                                          ("--snapshot", args.snapshot)) if value]
        if given or (args.kind == "filters" and args.key):
            raise ConfigError(f"{(given or ['--key'])[0]} applies to data uploads, not to --as {args.kind}")
        if args.kind == "filters":
            uri = client.upload_filters(args.file, bucket=args.bucket, stack=args.stack, endpoint_url=args.endpoint_url)
        else:
            uri = client.upload_responses(args.file, bucket=args.bucket, stack=args.stack, key=args.key,
                                          endpoint_url=args.endpoint_url)
        print(f"uploaded {uri}; alone it starts a refresh of the live model's lists (no training), after any run "
              f"in progress (follow it with `topx status`)")
        return 0
    uri = client.upload(args.file, bucket=args.bucket, stack=args.stack, key=args.key, implicit=args.implicit,
                        objective=args.objective, snapshot=args.snapshot, endpoint_url=args.endpoint_url)
    print(f"uploaded {uri}{' (implicit feedback)' if args.implicit else ''}; the starter starts one run for the "
          f"burst, after any run in progress (follow it with `topx status`)")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from topx.aws import client

    done = client.rollback(args.to, table=args.table, bucket=args.bucket, stack=args.stack,
                           endpoint_url=args.endpoint_url)
    kept = f"; {done['kept']} retired shard(s) of it kept again" if done["kept"] else ""
    if done["already_live"]:
        print(f"{done['version']} is already live; its items carry no expiry{kept}")
        return 0
    print(f"rolled back: {done['version']} is live ({done['users']:,} users), in place of {done['rolled_back_from']}"
          f"{kept}. {done['rolled_back_from']} is retired by the next run's load; the next run newer than it "
          f"publishes as usual")
    return 0


def cmd_offline(args: argparse.Namespace) -> int:
    from topx.offline.trial import run_trial

    if not args.bursts:
        raise ConfigError("topx offline needs at least one --upload (or --filters, --responses) to upload")
    return run_trial(args.bursts, dataset=args.dataset, snapshot=args.snapshot, quiet=args.quiet)


def cmd_status(args: argparse.Namespace) -> int:
    from topx.aws import client
    found = client.latest_executions(state_machine_arn=args.state_machine_arn, stack=args.stack, limit=args.limit,
                                     endpoint_url=args.endpoint_url)
    if not found:
        print("no executions yet: upload data with `topx upload FILE`")
    for execution in found:
        took = "" if execution.duration_s is None else f"{execution.duration_s:8.1f} s"
        refresh = "  (refresh: the live model with the current filters and responses)" \
            if execution.mode == RUN_MODE_REFRESH else ""
        print(f"  {execution.started:%Y-%m-%d %H:%M:%S}  {execution.status:<10} {took:>10}  {execution.name}{refresh}")
        if execution.uploads:
            shown = ", ".join(f"{u['path']}" + (f" ({u['objects']} objects)" if u["objects"] != 1 else "")
                              for u in execution.uploads[:5])
            more = f" and {len(execution.uploads) - 5} more folders" if len(execution.uploads) > 5 else ""
            print(f"      covers {shown}{more}")
    try:
        live = client.live_version(table=args.table, stack=args.stack, endpoint_url=args.endpoint_url)
    except ConfigError as exc:  # the executions were found; the table may simply not be named
        print(f"live version: unknown ({exc})")
        return 0
    if live is None:
        print("live version: none published yet")
    else:
        when = "" if live.published_at is None else f", published {live.published_at:%Y-%m-%d %H:%M:%S}"
        users = "" if live.users is None else f", {live.users:,} users"
        back = "" if live.rolled_back_from is None else f", rolled back from {live.rolled_back_from}"
        print(f"live version: {live.version}{users}{when}{back}")
    return 0


ALIASES = {"refresh": "recommend"}
COMMANDS = {"run": cmd_run, "tune": cmd_tune, "train": cmd_train, "vectors": cmd_vectors, "recommend": cmd_recommend,
            "evaluate": cmd_evaluate, "demo": cmd_demo, "recs": cmd_recs, "upload": cmd_upload, "status": cmd_status,
            "rollback": cmd_rollback, "offline": cmd_offline, "report": cmd_report}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[ALIASES.get(args.command, args.command)](args)
    except TopxError as exc:
        print(f"topx: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("topx: interrupted; outputs were left as they were", file=sys.stderr)
        return 130



if __name__ == "__main__":
    sys.exit(main())

"""``topx demo``: the product's promise, offline. Data dropped into S3 comes back as recommendations
read from DynamoDB, through the state machine CDK deploys, with every step doing its real work under moto
(the offline AWS stand-ins of ``topx.offline``). ``topx demo --no-aws-stand-ins`` runs the same stages as
plain functions instead, as ``topx run`` does, and needs no moto.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from topx.config import env_or
from topx.contract import (
    ENV_EPOCHS,
    ENV_NUM_FACTORS,
    feature_table_prefix,
    metrics_key,
    report_key,
    run_prefix,
)
from topx.synth import SyntheticData, generate

# The demo's model size: small enough for a laptop CPU, big enough to beat popularity clearly.
# TOPX_EPOCHS / TOPX_NUM_FACTORS override them.
DEMO_EPOCHS = 12
DEMO_NUM_FACTORS = 32
DEMO_SHARDS = 4
SHOWN_USERS = 3
SHOWN_ITEMS = 5


def run_demo(
    *,
    out: str | None = None,
    n_users: int = 3000,
    n_items: int = 1500,
    implicit: bool = True,
    top_x: int = 10,
    seed: int = 7,
    quiet: bool = False,
    aws_stand_ins: bool = True,
) -> int:
    if aws_stand_ins:
        from topx.offline import check_offline_extra

        check_offline_extra()  # before the data is generated, not after
    runner = _run_offline if aws_stand_ins else _run_stages
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="topx-demo-"))
    try:
        data = generate(n_users, n_items, implicit=implicit, seed=seed)
        print(f"generated {len(data.interactions):,} interactions from {n_users:,} users on {n_items:,} items "
              f"(with user and item features)")
        code = runner(data, work, out=out, implicit=implicit, top_x=top_x, quiet=quiet)
        kept = f"; outputs in {Path(out).resolve()}" if out and code == 0 else ""
        print(f"\ndemo finished in {time.perf_counter() - start:.1f} s{kept}")
        return code
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _epochs() -> int:
    return env_or(ENV_EPOCHS, None, DEMO_EPOCHS, int)


def _num_factors() -> int:
    return env_or(ENV_NUM_FACTORS, None, DEMO_NUM_FACTORS, int)


# ----------------------------------------------------------------------------- the deployed pipeline, offline


def _run_offline(data: SyntheticData, work: Path, *, out: str | None, implicit: bool, top_x: int,
                 quiet: bool) -> int:
    import boto3

    from topx import offline
    from topx.aws import client

    # Uploads name their columns as the prepare stage reads them: user_id, item_id, rating.
    frame = data.interactions.rename(columns={"plays": "rating"})
    interactions = work / "interactions.csv"
    frame.to_csv(interactions, index=False)
    paths = data.write(work / "features")
    settings = offline.LocalSettings(top_x=top_x, num_factors=_num_factors(), epochs=_epochs(), shards=DEMO_SHARDS)

    with offline.offline():
        pipeline = offline.deploy(settings)
        print(f"deployed to moto (in this process): bucket {pipeline.bucket}, table {pipeline.table}, "
              f"state machine {pipeline.state_machine_arn.rsplit(':', 1)[-1]} from statemachine/pipeline.asl.json "
              f"(k={settings.num_factors}, {settings.epochs} epochs, {settings.shards} search shards)")
        s3 = boto3.client("s3", region_name=pipeline.region)
        for name in ("users", "items"):
            s3.upload_file(str(paths[name]), pipeline.bucket, feature_table_prefix(name) + ".csv")
        uri = client.upload(interactions, bucket=pipeline.bucket, implicit=implicit)
        # The upload rule queued the upload; the batching window closes, and the starter reads the queue.
        offline.deliver_uploads(pipeline)
        executions = offline.executions(pipeline.state_machine_arn, region=pipeline.region)
        if not executions:
            print(f"uploaded {uri}, but no execution started: the upload rule did not match")
            return 1
        execution = executions[0]
        print(f"uploaded {uri}{' (play counts)' if implicit else ' (1-5 ratings)'}; the upload rule queued it and "
              f"the starter started execution {execution['name']}\n")

        states = set(offline.top_level_states())
        described = offline.wait_for_execution(
            execution["executionArn"], region=pipeline.region,
            on_state=None if quiet else (lambda event: _progress(event, states)),
        )
        for note in offline.notifications(pipeline):
            print(f"\nnotification: {note.subject}\n  {_shorten(note.message)}")
        if described["status"] != "SUCCEEDED":
            print(f"\nexecution {described['status']}: {described.get('error', '')}: {described.get('cause', '')}")
            return 1
        run_id = json.loads(described["output"])["prepare"]["run_id"]
        metrics = json.loads(s3.get_object(Bucket=pipeline.bucket, Key=metrics_key(run_id))["Body"].read())
        live = client.live_version(table=pipeline.table)
        print(f"\nrecommendations read back from DynamoDB through the pointer (live version {live.version if live else '-'}):")
        for user in sorted(frame["user_id"].unique())[:SHOWN_USERS]:
            rec = client.get_recommendations(user, table=pipeline.table)
            if rec is None:
                print(f"  {user}: none")
                continue
            _print_user(user, list(zip(rec.items, rec.scores, strict=True)), data.items)
        _print_metrics(metrics, top_x, f"hold-out metrics from s3://{pipeline.bucket}/{metrics_key(run_id)}")
        if out:
            _download_run(s3, pipeline.bucket, run_id, Path(out))
            print(f"\nreport: {(Path(out) / 'report.html').resolve()} (open it in a browser)")
        else:
            print(f"\nreport: s3://{pipeline.bucket}/{report_key(run_id)} (gone with the stand-ins: keep it with --out DIR)")
    return 0


def _progress(event: Any, states: set[str]) -> None:
    if event.state == "(execution)":
        print(f"  {'execution':<14} {event.outcome} after {event.seconds:.1f} s")
    elif event.state in states and event.outcome == "done":
        print(f"  {event.state:<14} done in {event.seconds:5.1f} s")
    elif event.outcome == "failed":
        print(f"  {event.state:<14} failed ({event.error}) after {event.seconds:.1f} s")


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _download_run(s3: Any, bucket: str, run_id: str, out: Path) -> None:
    """Keep the run's objects (model, vectors, recommendations, metrics) before moto goes away."""
    prefix = run_prefix(run_id)
    if out.exists():
        shutil.rmtree(out)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            target = out / obj["Key"][len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(target))


# ----------------------------------------------------------------------------- the same stages, no AWS stand-ins


def _run_stages(data: SyntheticData, work: Path, *, out: str | None, implicit: bool, top_x: int,
               quiet: bool) -> int:
    from topx.config import default_hyperparameters
    from topx.dataset import DataOptions
    from topx.run import run_all
    from topx.steps import Reporter, RunOptions

    paths = data.write(work / "input")
    options = DataOptions(
        interactions=str(paths["interactions"]), users=str(paths["users"]), items=str(paths["items"]),
        # Ranking, as the deployed pipeline trains an unmarked upload: the column weighs each interaction.
        rating_col="plays" if implicit else "rating", implicit=True,
    )
    hp = default_hyperparameters("ranking", num_factors=_num_factors(), epochs=_epochs())
    result_dir = Path(out) if out else work / "out"
    metrics = run_all(options, hp, RunOptions(top_x=top_x, progress=False if quiet else None), result_dir,
                      reporter=Reporter(not quiet))
    recs = pd.read_parquet(result_dir / "recommendations.parquet")
    print(f"\nrecommendations for {SHOWN_USERS} users (of {recs['user_id'].nunique():,}):")
    for user in recs["user_id"].drop_duplicates().head(SHOWN_USERS):
        rows = recs[recs["user_id"] == user]
        _print_user(user, list(zip(rows["item_id"], rows["score"], strict=True)), data.items)
    _print_metrics(metrics, top_x, "hold-out metrics")
    if out:
        print(f"\nreport: {(result_dir / 'report.html').resolve()} (open it in a browser)")
    return 0


# ----------------------------------------------------------------------------- shared output


def _print_user(user: str, ranked: list[tuple[str, float]], items: pd.DataFrame) -> None:
    catalogue = items.set_index("item_id")
    print(f"  {user}:")
    for rank, (item, score) in enumerate(ranked[:SHOWN_ITEMS], start=1):
        info = catalogue.loc[item]
        print(f"    {rank:>2}. {item}  {info['category']:<8} {info['tags']:<24} score {score:+.3f}")


def _print_metrics(metrics: Mapping[str, Any], x: int, title: str) -> None:
    print(f"\n{title} (topx vs popularity baseline):")
    for name in ("recall", "ndcg", "map", "coverage"):
        key = f"{name}_at_{x}"
        if key in metrics:
            print(f"  {key:<14} topx {metrics[key]:.4f}   popularity {metrics['popularity_' + key]:.4f}")
    for key in ("rmse", "rmse_global_mean", "auc", "log_loss"):
        if key in metrics:
            print(f"  {key:<14} {metrics[key]:.4f}")

"""Light commands stay light: the CLI's parser (every --help), reading recommendations, the deployed
stack's client, the Lambda handlers' module and the data preparation import neither torch nor faiss; the
deploy contract, which `cdk synth` imports, not even numpy; the CLI and the offline package import no moto,
which is an optional extra. Each check runs in a fresh interpreter, where sys.modules shows exactly what the
import pulled in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "faiss")
# What the CDK app must not load through topx: the array and AWS libraries too.
NOT_IN_SYNTH = ("numpy", "torch", "faiss", "pandas", "boto3")


def heavy_modules_after(code: str, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code", [
    "from topx.cli import build_parser; build_parser()",
    "from topx.cli import main\ntry:\n    main(['recs', '--help'])\nexcept SystemExit:\n    pass",
    "import topx.aws.client, topx.aws.store",
    "import functions.handlers",
    # What the Prepare function runs: reading, validating and indexing the upload.
    "from topx.dataset import DataOptions, load_dataset\nfrom topx.rundir import save_interactions\nimport topx.aws.stages",
])
def test_light_entry_points_import_neither_torch_nor_faiss(code: str) -> None:
    assert heavy_modules_after(code) == []


def test_the_probe_sees_a_heavy_import_when_there_is_one() -> None:
    assert heavy_modules_after("import topx.icd") == ["torch"]


@pytest.mark.parametrize("code", [
    "from topx.cli import build_parser; build_parser()",
    "from topx.cli import main\ntry:\n    main(['demo', '--help'])\nexcept SystemExit:\n    pass",
    # Importing the offline package does not need its extra: offline() checks for it, then imports moto.
    "import topx.offline, topx.offline.demo",
])
def test_the_cli_and_the_offline_package_import_no_moto(code: str) -> None:
    assert heavy_modules_after(code, ("moto",)) == []


@pytest.mark.parametrize("code", ["import topx.contract", "import infra.settings"])
def test_the_deploy_contract_imports_no_numpy_torch_or_faiss(code: str) -> None:
    assert heavy_modules_after(code, NOT_IN_SYNTH) == []


# --- the Lambda functions at work ----------------------------------------------------------------------
# Importing the handlers' module is not enough: the stages import what they use when they run. So each
# Lambda handler runs in a fresh interpreter, under moto, on the bucket an earlier stage left (copied in
# from a folder), and the probe reports what its run loaded. The heavy stages (train, search: AWS Batch)
# run in this process, between the Lambda groups, as the state machine orders them.

LAMBDA_PROBE = """
import json, sys
from pathlib import Path

import boto3
from moto import mock_aws

from topx.contract import table_attribute_definitions, table_key_schema

snapshot, bucket, table = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
calls, control = json.loads(sys.argv[4]), json.loads(sys.argv[5])
heavy = {heavy!r}
with mock_aws():
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    for path in sorted(snapshot.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, path.relative_to(snapshot).as_posix())
    boto3.client("dynamodb").create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                                          KeySchema=table_key_schema(),
                                          AttributeDefinitions=table_attribute_definitions())
    import functions.handlers as handlers

    replies = [getattr(handlers, name)(event, None) for name, event in calls]
    loaded = sorted(m for m in heavy if m in sys.modules)
    after_control = None
    if control:
        from topx.aws import stages

        getattr(stages, control[0])(*control[1])
        after_control = sorted(m for m in heavy if m in sys.modules)
print(json.dumps({{"replies": replies, "heavy": loaded, "after_control": after_control}}))
"""
BUCKET, TABLE = "topx-probe-bucket", "topx-probe-table"
# Every function of infra/lambdas.py, in the order the state machine runs them.
LAMBDA_HANDLERS = ("prepare", "quality_gate", "repackage", "report", "load_shard", "publish")


def _run_lambdas(s3, folder: Path, calls: list[tuple[str, dict]], control: tuple[str, list] | None = None) -> dict:
    """Copy the bucket into ``folder``, then run ``calls`` ((handler, event) pairs) in a fresh interpreter;
    ``control``, a (stage function, arguments) pair run after them, shows what a heavy stage loads there."""
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            target = folder / obj["Key"]
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(BUCKET, obj["Key"], str(target))
    probe = LAMBDA_PROBE.format(heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", probe, str(folder), BUCKET, TABLE, json.dumps(calls),
                           json.dumps(control)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_every_lambda_function_runs_without_torch_or_faiss(tmp_path, monkeypatch) -> None:
    import boto3
    from moto import mock_aws
    from reliability_stack import base_ratings

    from infra.lambdas import SPECS
    from topx.aws import stages
    from topx.contract import table_attribute_definitions, table_key_schema

    assert {spec.handler for spec in SPECS} == set(LAMBDA_HANDLERS), (
        "a Lambda function was added or removed: run it in this test too")
    for name, value in {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "TOPX_EPOCHS": "3", "TOPX_NUM_FACTORS": "4",
                        "TOPX_TOP_X": "5", "TOPX_SHARDS": "2"}.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        s3, ddb = boto3.client("s3"), boto3.client("dynamodb")
        s3.create_bucket(Bucket=BUCKET)
        ddb.create_table(TableName=TABLE, BillingMode="PAY_PER_REQUEST", KeySchema=table_key_schema(),
                         AttributeDefinitions=table_attribute_definitions())
        stages.use_clients(s3=s3, dynamodb=ddb)
        try:
            base_ratings(60, 24, seed=5).to_csv(tmp_path / "ratings.csv", index=False)
            s3.upload_file(str(tmp_path / "ratings.csv"), BUCKET, "incoming/ratings.csv")
            upload = {"bucket": BUCKET, "key": "incoming/ratings.csv"}
            got = _run_lambdas(s3, tmp_path / "uploaded", [("prepare", upload)])
            assert got["replies"][0]["n_interactions"] > 0 and got["heavy"] == [], got

            prepared = stages.prepare_run(BUCKET, "incoming/ratings.csv")
            run = {"bucket": BUCKET, "run_id": prepared["run_id"]}
            stages.train_run(BUCKET, run["run_id"])
            # The search of one shard, run after the Lambdas in the same interpreter, loads torch there:
            # the probe sees a heavy import when there is one.
            got = _run_lambdas(s3, tmp_path / "trained", [("quality_gate", {**run, "table": TABLE}),
                                                          ("repackage", run)],
                               control=("search_shard", [BUCKET, run["run_id"], 0, prepared["shards"]]))
            assert got["heavy"] == [] and "torch" in got["after_control"], got
            gate, vectors = got["replies"]
            assert isinstance(gate["passed"], bool) and vectors["n_items"] == prepared["n_items"]

            stages.quality_gate(BUCKET, run["run_id"], TABLE)
            stages.repackage_run(BUCKET, run["run_id"])
            for shard in prepared["shard_ids"]:
                stages.search_shard(BUCKET, run["run_id"], shard, prepared["shards"])
            calls = [("report", {**run, "gate": gate}),
                     *(("load_shard", {**run, "table": TABLE, "shard": shard}) for shard in prepared["shard_ids"]),
                     ("publish", {**run, "table": TABLE, "expected_shards": prepared["shards"]})]
            got = _run_lambdas(s3, tmp_path / "searched", calls)
            assert got["heavy"] == [], got
            assert got["replies"][0]["bytes"] > 0 and got["replies"][-1]["published"] is True, got
        finally:
            stages.use_clients(s3=None, dynamodb=None)

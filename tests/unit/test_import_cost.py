"""Light commands stay light: the CLI's parser (every --help), reading recommendations, the deployed
stack's client, the Lambda handlers' module and the data preparation import neither torch nor faiss; the
deploy contract, which `cdk synth` imports, not even numpy; the CLI and the offline package import no moto,
which is an optional extra. Each check runs in a fresh interpreter, where sys.modules shows exactly what the
import pulled in. The pipeline's stages also run, each in its own interpreter: no Lambda function loads
torch or faiss, which the functions image does not install (functions/requirements.txt)."""

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


# --- the functions and the jobs at work ----------------------------------------------------------------
# Importing the handlers' module is not enough: the stages import what they use when they run. So the
# pipeline runs stage by stage, each in a fresh interpreter under moto, on the bucket the stage before
# left (carried from one interpreter to the next in a folder), and each reports what its run loaded: no
# Lambda function loads torch, faiss or tqdm (its image has none of them), no batch job loads matplotlib
# (theirs has none), and the train job does load torch, which shows that the probe sees a heavy import.

STAGE_PROBE = """
import importlib, json, sys
from pathlib import Path

import boto3
from moto import mock_aws

from topx.contract import table_attribute_definitions, table_key_schema

before, after, bucket, table = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
calls, watched = json.loads(sys.argv[5]), json.loads(sys.argv[6])
with mock_aws():
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    for path in sorted(before.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, path.relative_to(before).as_posix())
    boto3.client("dynamodb").create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                                          KeySchema=table_key_schema(),
                                          AttributeDefinitions=table_attribute_definitions())
    # A state machine for the starter to look at (it starts nothing when nothing waits).
    boto3.client("stepfunctions").create_state_machine(
        name="probe", roleArn="arn:aws:iam::123456789012:role/probe",
        definition=json.dumps({"StartAt": "Done", "States": {"Done": {"Type": "Succeed"}}}))
    modules = {"handler": "functions.handlers", "stage": "topx.aws.stages"}
    # What Powertools' Logger reads of the Lambda runtime's context.
    context = type("Context", (), {"function_name": "probe", "memory_limit_in_mb": 1024, "aws_request_id": "probe",
                                   "invoked_function_arn": "arn:aws:lambda:us-east-1:123456789012:function:probe"})()
    replies = []
    for kind, name, args in calls:
        function = getattr(importlib.import_module(modules[kind]), name)
        replies.append(function(args, context) if kind == "handler" else function(*args))
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            (after / obj["Key"]).parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(after / obj["Key"]))
print(json.dumps({"replies": replies, "loaded": sorted(m for m in watched if m in sys.modules)}))
"""
BUCKET, TABLE = "topx-probe-bucket", "topx-probe-table"
# Every function of infra/lambdas.py, in the order the state machine runs them.
LAMBDA_HANDLERS = ("starter", "prepare", "quality_gate", "repackage", "report", "load_shard", "publish",
                   "compute_health")
PROBE_STATE_MACHINE = "arn:aws:states:us-east-1:123456789012:stateMachine:probe"
# tqdm: the trainers' progress bars, which the functions image leaves out too.
WATCHED = (*HEAVY, "matplotlib", "tqdm")


def _run_stages(before: Path, after: Path, calls: list[tuple[str, str, object]]) -> tuple[list, list[str]]:
    """Run ``calls`` (("handler", name, event) or ("stage", name, arguments)) in a fresh interpreter on the
    bucket held in folder ``before``; the bucket they leave goes to folder ``after``. -> (their replies,
    the WATCHED modules they loaded)."""
    after.mkdir()
    done = subprocess.run([sys.executable, "-c", STAGE_PROBE, str(before), str(after), BUCKET, TABLE,
                           json.dumps(calls), json.dumps(WATCHED)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    return got["replies"], got["loaded"]


@pytest.mark.slow
def test_no_lambda_function_loads_torch_faiss_or_tqdm_and_no_batch_job_matplotlib(tmp_path, monkeypatch) -> None:
    from reliability_stack import base_ratings

    from infra.lambdas import SPECS

    assert {spec.handler for spec in SPECS} == set(LAMBDA_HANDLERS), (
        "a Lambda function was added or removed: run it in this test too")
    for name, value in {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "TOPX_EPOCHS": "3", "TOPX_NUM_FACTORS": "4",
                        "TOPX_TOP_X": "5", "TOPX_SHARDS": "2"}.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "0" / "incoming").mkdir(parents=True)
    base_ratings(60, 24, seed=5).to_csv(tmp_path / "0" / "incoming" / "ratings.csv", index=False)

    (prepared,), loaded = _run_stages(tmp_path / "0", tmp_path / "1", [
        ("handler", "prepare", {"bucket": BUCKET, "key": "incoming/ratings.csv"})])
    assert prepared["n_interactions"] > 0 and loaded == [], loaded
    run = {"bucket": BUCKET, "run_id": prepared["run_id"]}

    _, loaded = _run_stages(tmp_path / "1", tmp_path / "2", [("stage", "train_run", [BUCKET, run["run_id"]])])
    assert "torch" in loaded and "matplotlib" not in loaded, loaded

    (gate, vectors), loaded = _run_stages(tmp_path / "2", tmp_path / "3", [
        ("handler", "quality_gate", {**run, "table": TABLE}), ("handler", "repackage", run)])
    assert gate["passed"] is True and vectors["n_items"] == prepared["n_items"] and loaded == [], loaded

    _, loaded = _run_stages(tmp_path / "3", tmp_path / "4", [
        ("stage", "search_shard", [BUCKET, run["run_id"], shard, prepared["shards"]])
        for shard in prepared["shard_ids"]])
    assert "matplotlib" not in loaded, loaded

    replies, loaded = _run_stages(tmp_path / "4", tmp_path / "5", [
        ("handler", "report", {**run, "gate": gate}),
        *(("handler", "load_shard", {**run, "table": TABLE, "shard": shard}) for shard in prepared["shard_ids"]),
        ("handler", "publish", {**run, "table": TABLE, "expected_shards": prepared["shards"]})])
    assert replies[0]["bytes"] > 0 and replies[-1]["published"] is True
    # The report draws its plots with matplotlib: the functions image has it, and nothing heavier.
    assert loaded == ["matplotlib"], loaded

    # The starter, on a batch with nothing in it: it reads the trigger item and starts nothing.
    (started,), loaded = _run_stages(tmp_path / "5", tmp_path / "6", [
        ("handler", "starter", {"Records": [], "bucket": BUCKET, "table": TABLE,
                                "state_machine_arn": PROBE_STATE_MACHINE})])
    assert started["started"] is None and loaded == [], (started, loaded)

    # The compute health check, asking moto's Batch about an environment it does not have.
    monkeypatch.setenv("TOPX_COMPUTE_ENVIRONMENTS", "topx-gone")
    (health,), loaded = _run_stages(tmp_path / "6", tmp_path / "7", [("handler", "compute_health", {})])
    assert health["missing"] == ["topx-gone"] and loaded == [], (health, loaded)

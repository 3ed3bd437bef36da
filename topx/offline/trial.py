"""``topx offline``: the deployed pipeline on the user's own files, before ``cdk deploy``.

As ``topx demo`` does with generated data: moto in this process, the stack's resources and the state
machine deployed into it (``topx.offline.deploy``), and then each burst uploaded in the order given, as
``topx upload`` puts it: ``--upload`` PATH under ``incoming/``, ``--filters`` FILE at ``config/filters.json``,
``--responses`` PATH under ``responses/`` (the last two, after a published run, make a refresh). After each burst the upload queue's batching window
closes (``topx.offline.deliver``) and the starter starts a run, or lets the burst wait for the run in
progress; each run is followed to its end, whose event brings the starter back for what waited. Progress
goes to stderr; stdout ends with one JSON line, ``{"executions": [{"status", "uploads", ...}],
"users_published": N}``, and the exit status is 0 when every execution succeeded.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from topx.contract import RUN_MODE_FULL
from topx.errors import ConfigError

# How long one execution may take offline before the trial gives up on it.
EXECUTION_TIMEOUT_S = 3600.0


def _say(text: str, quiet: bool) -> None:
    if not quiet:
        print(text, file=sys.stderr)


def _dataset_text(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the dataset configuration: {exc.strerror or exc}") from exc


# The option that names each kind of burst (topx.cli's _Burst).
BURST_OPTIONS = {"data": "--upload", "filters": "--filters", "responses": "--responses"}


def run_trial(bursts: Sequence[tuple[str, str]], *, dataset: str | None = None, snapshot: str | None = None,
              quiet: bool = False) -> int:
    """``bursts``: (kind, path) in upload order, kind "data", "filters" or "responses"."""
    from topx.offline.patches import check_offline_extra

    check_offline_extra()
    for kind, path in bursts:
        if not Path(path).exists():
            raise ConfigError(f"{BURST_OPTIONS[kind]} {path}: no such file or folder")
        if kind == "filters":
            from topx.filters import load_filters

            load_filters(path)  # a malformed filter file is refused before anything starts
    settings_dataset = _dataset_text(dataset)
    summary = _trial(list(bursts), settings_dataset, snapshot, quiet)
    print(json.dumps(summary, sort_keys=True))
    return 0 if summary["executions"] and all(e["status"] == "SUCCEEDED" for e in summary["executions"]) else 1


def _trial(bursts: list[tuple[str, str]], dataset: str | None, snapshot: str | None, quiet: bool) -> dict[str, Any]:
    import boto3

    from topx import offline
    from topx.aws import client

    with offline.offline():
        pipeline = offline.deploy(offline.LocalSettings(dataset=dataset))
        _say(f"deployed to the offline stand-ins: bucket {pipeline.bucket}, state machine "
             f"{pipeline.state_machine_arn.rsplit(':', 1)[-1]}", quiet)
        s3 = boto3.client("s3", region_name=pipeline.region)
        sfn = boto3.client("stepfunctions", region_name=pipeline.region)
        data_bursts = 0
        for position, (kind, path) in enumerate(bursts):
            if kind == "filters":
                uri = client.upload_filters(path, bucket=pipeline.bucket, client=s3)
            elif kind == "responses":
                uri = client.upload_responses(path, bucket=pipeline.bucket, client=s3)
            else:
                uri = client.upload(path, bucket=pipeline.bucket, snapshot=snapshot if data_bursts == 0 else None,
                                    client=s3)
                data_bursts += 1
            _say(f"burst {position + 1}: uploaded {path} to {uri}", quiet)
            _deliver(pipeline, quiet)
        # Every burst is in; what still waits starts once the run in progress ends, one run at a time.
        while _deliver(pipeline, quiet):
            pass
        ran = sorted(offline.executions(pipeline.state_machine_arn, region=pipeline.region),
                     key=lambda e: e["startDate"])
        notes = offline.notifications(pipeline)
        for note in notes:
            _say(f"notification: {note.subject}: {note.message[:600]}", quiet)
        executions = []
        for execution in ran:
            described = sfn.describe_execution(executionArn=execution["executionArn"])
            given = json.loads(described["input"])
            entry: dict[str, Any] = {"name": execution["name"], "status": described["status"],
                                     "mode": given.get("mode", RUN_MODE_FULL), "uploads": given.get("uploads")}
            if described["status"] != "SUCCEEDED":
                entry["error"] = described.get("error")
                # The failure notification names the step, the object, the row and the column at fault.
                told = [note.message for note in notes if execution["name"] in note.message]
                entry["cause"] = (told[0] if told else described.get("cause") or "")[:4000]
            executions.append(entry)
        live = client.live_version(table=pipeline.table)
        return {"executions": executions, "users_published": (live.users or 0) if live else 0}


def _deliver(pipeline: Any, quiet: bool) -> bool:
    """Close the batching window; follow the run it started, if any, to its end. True when one started."""
    from topx import offline

    delivery = offline.deliver_uploads(pipeline)
    if delivery is None or delivery.started is None:
        if delivery is not None and delivery.reply.get("waiting_for"):
            _say(f"  waiting for the run in progress ({delivery.reply['pending_uploads']} upload(s) wait)", quiet)
        return False
    name = delivery.started.rsplit(":", 1)[-1]
    _say(f"  the starter started {name}", quiet)
    described = offline.wait_for_execution(delivery.started, region=pipeline.region, timeout_s=EXECUTION_TIMEOUT_S)
    _say(f"  {name}: {described['status']}", quiet)
    return True

"""Offline checks of statemachine/pipeline.asl.json and trigger.json, without synthesizing the stack.

They catch the mistakes a deploy would only reveal at run time: a path to a field no earlier state
produces, a Batch parameter the job command does not read, a non-string Batch parameter value.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from infra.access import INPUT_PREFIXES
from infra.pipeline import load_trigger
from infra.settings import ASL_PATH
from topx.aws import trigger as trigger_module
from topx.contract import CONFIG_PREFIX, INCOMING_PREFIX, RESPONSES_PREFIX, SEARCH_COMMAND, TRAIN_COMMAND

PATH_RE = re.compile(r"\$\.([a-z_]+)(?:\.([a-z_]+))?")


@pytest.fixture(scope="module")
def asl() -> dict[str, Any]:
    return json.loads(ASL_PATH.read_text(encoding="utf-8"))


def _paths(node: Any) -> list[str]:
    """Every JSONPath a `.$` field, Choice variable or ItemsPath reads."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str) and (key.endswith(".$") or key in ("Variable", "ItemsPath")):
                found.append(value)
            else:
                found.extend(_paths(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_paths(value))
    return found


def test_paths_read_only_fields_an_earlier_state_wrote(asl: dict[str, Any]) -> None:
    states = asl["States"]
    # What each ResultPath holds: the keys of the state's ResultSelector.
    # The execution input: what the starter gives (topx/aws/trigger.py).
    produced: dict[str, set[str]] = {"bucket": set(), "key": set(), "uploads": set(), "mode": set(), "error": set()}
    for state in states.values():
        if isinstance(state.get("ResultPath"), str):
            namespace = state["ResultPath"].removeprefix("$.")
            produced[namespace] = {k.removesuffix(".$") for k in state.get("ResultSelector", {})}
    for name, state in states.items():
        reads = _paths({k: v for k, v in state.items() if k not in ("ItemProcessor", "ResultSelector")})
        for path in reads:
            for namespace, field in PATH_RE.findall(path.replace("$$.", "")):
                assert namespace in produced, f"{name} reads $.{namespace}, which no state writes"
                if field and produced[namespace]:
                    assert field in produced[namespace], f"{name} reads $.{namespace}.{field}"


@pytest.mark.parametrize(("state", "command"), [("Train", TRAIN_COMMAND), ("Search", SEARCH_COMMAND)])
def test_batch_parameters_match_the_job_command_and_are_strings(
    asl: dict[str, Any], state: str, command: tuple[str, ...]
) -> None:
    parameters = asl["States"][state]["Parameters"]["Parameters"]
    sent = {key.removesuffix(".$") for key in parameters}
    read = {arg.removeprefix("Ref::") for arg in command if arg.startswith("Ref::")}
    assert sent == read
    # SubmitJob parameters are string to string: a number must go through States.Format.
    assert parameters.get("shards.$", "States.Format").startswith("States.Format")


def test_load_iterations_get_what_load_shard_parses(asl: dict[str, Any]) -> None:
    load = asl["States"]["Load"]
    assert set(load["ItemSelector"]) == {"bucket.$", "run_id.$", "shard.$", "table"}
    assert load["ItemSelector"]["shard.$"] == "$$.Map.Item.Value"
    (inner,) = load["ItemProcessor"]["States"].values()
    assert inner["Parameters"] == {"FunctionName": "${LoadShardFunctionArn}", "Payload.$": "$"}


def test_load_keeps_no_per_shard_result_in_the_execution_state(asl: dict[str, Any]) -> None:
    """Kept, a {shard, written} per shard outgrows the 256 KB state limit near 8,000 shards, raising
    States.DataLimitExceeded, which no States.ALL catch sees. Publish reads the counts from S3."""
    assert asl["States"]["Load"]["ResultPath"] is None


def test_numbers_in_the_definition_are_literals_not_placeholders() -> None:
    text = ASL_PATH.read_text(encoding="utf-8")
    assert not re.search(r":\s*\$\{", text), "a ${...} placeholder outside a string would not be valid JSON"


def test_trigger_file_holds_the_rule_constants() -> None:
    trigger = load_trigger()
    assert trigger["source"] == "aws.s3"
    assert trigger["detail_type"] == "Object Created"
    # The prefixes the starter takes uploads from: data, settings and responses, each one the prepare role reads.
    assert trigger["key_prefixes"] == list(trigger_module.UPLOAD_PREFIXES) == [INCOMING_PREFIX, CONFIG_PREFIX,
                                                                               RESPONSES_PREFIX]
    assert set(trigger["key_prefixes"]) <= set(INPUT_PREFIXES)
    assert set(trigger) == {"description", "source", "detail_type", "key_prefixes"}

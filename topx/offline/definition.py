"""The deployed definition, offline: ``statemachine/pipeline.asl.json`` with its ``${...}`` placeholders
filled, and the rules that feed the upload queue (``statemachine/trigger.json``'s upload rule, and the
run-ended rule) as the CDK rules build them.

``fill_definition`` refuses a placeholder without a value and a value without a placeholder, so the state
machine ``topx.offline.deploy`` creates is the one CDK deploys with moto's ARNs in it. ``transform_input``
applies an EventBridge input transformer to an event as EventBridge does: moto cannot deliver a rule to a
state machine, and ``topx.offline.patches`` delivers with it (the stack's rules target the upload queue,
which moto delivers to itself). No AWS client or moto here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from topx.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
ASL_PATH = REPO_ROOT / "statemachine" / "pipeline.asl.json"
TRIGGER_PATH = REPO_ROOT / "statemachine" / "trigger.json"
PLACEHOLDER_RE = re.compile(r"\$\{([A-Za-z][A-Za-z0-9]*)\}")

# The ASL's placeholder for each handler's function (statemachine/pipeline.asl.json; infra/pipeline.py fills
# the same ones). The handler module and the Batch job commands are the deploy contract's.
FUNCTION_PLACEHOLDERS = {
    "prepare": "PrepareFunctionArn",
    "quality_gate": "QualityGateFunctionArn",
    "repackage": "RepackageFunctionArn",
    "load_shard": "LoadShardFunctionArn",
    "publish": "PublishFunctionArn",
    "report": "ReportFunctionArn",
}


class DefinitionError(ConfigError):
    """The ASL's placeholders and the values offered for them do not match."""


# --------------------------------------------------------------------------- definition and trigger


def placeholders(definition: str) -> set[str]:
    return set(PLACEHOLDER_RE.findall(definition))


def load_definition() -> str:
    """The ASL text CDK deploys; the offline runner needs the repository checkout that holds it."""
    try:
        return ASL_PATH.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{ASL_PATH} not found: the offline pipeline runs from a checkout of the repository") from exc


def fill_definition(definition: str, substitutions: Mapping[str, str]) -> str:
    """Replace every ``${Name}``; a placeholder without a value, or a value without a placeholder, is an error."""
    used = placeholders(definition)
    if used != set(substitutions):
        raise DefinitionError(
            f"{ASL_PATH.name}: placeholders without a value: {sorted(used - set(substitutions))}; "
            f"values without a placeholder: {sorted(set(substitutions) - used)}"
        )
    return PLACEHOLDER_RE.sub(lambda match: substitutions[match.group(1)], definition)


def load_trigger() -> dict[str, Any]:
    """statemachine/trigger.json: the upload rule's fixed parts, shared with infra/pipeline.py."""
    return json.loads(TRIGGER_PATH.read_text(encoding="utf-8"))


def upload_event_pattern(trigger: Mapping[str, Any], bucket: str) -> dict[str, Any]:
    """The upload rule's event pattern, as the CDK rule builds it from the same file."""
    return {
        "source": [trigger["source"]],
        "detail-type": [trigger["detail_type"]],
        "detail": {"bucket": {"name": [bucket]}, "object": {"key": [{"prefix": prefix} for prefix in trigger["key_prefixes"]]}},
    }


def run_ended_event_pattern(state_machine_arn: str) -> dict[str, Any]:
    """The rule that queues each end of an execution for the starter, as infra/pipeline.py builds it."""
    from topx.aws.trigger import ENDED_STATUSES, RUN_ENDED_EVENT

    return {
        "source": [RUN_ENDED_EVENT[0]],
        "detail-type": [RUN_ENDED_EVENT[1]],
        "detail": {"stateMachineArn": [state_machine_arn], "status": sorted(ENDED_STATUSES)},
    }


def transform_input(transformer: Mapping[str, Any], event: Mapping[str, Any]) -> str:
    """Apply an EventBridge input transformer to an event.

    A ``<name>`` inside a JSON string takes the value's text; anywhere else it takes the value's JSON
    (a string gets its quotes, a missing path gives null), which is how CDK's ``from_object`` templates read.
    """
    values = {name: _json_path(event, path) for name, path in transformer.get("InputPathsMap", {}).items()}
    template = transformer["InputTemplate"]
    out: list[str] = []
    in_string = False
    i = 0
    while i < len(template):
        char = template[i]
        match = _PLACEHOLDER.match(template, i) if char == "<" else None
        if match and match.group(1) in values:
            value = values[match.group(1)]
            if in_string:
                text = value if isinstance(value, str) else json.dumps(value)
                out.append(json.dumps(text)[1:-1])
            else:
                out.append(json.dumps(value))
            i = match.end()
            continue
        if char == "\\" and in_string:
            out.append(template[i:i + 2])
            i += 2
            continue
        if char == '"':
            in_string = not in_string
        out.append(char)
        i += 1
    return "".join(out)


_PLACEHOLDER = re.compile(r"<([A-Za-z0-9_.-]+)>")


def _json_path(event: Mapping[str, Any], path: str) -> Any:
    node: Any = event
    for part in path.removeprefix("$.").split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node

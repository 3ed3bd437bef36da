"""Least privilege, encryption, no public access and no secrets, checked on the synthesized template.

The app is synthesized once for the module with every optional context parameter set (schedule,
e-mail subscription, Spot), so every resource the stack can create is in the template; synthesis also
runs the AwsSolutions checks of cdk-nag, which fail it on any unacknowledged finding.

checkov scans the same template from its own environment (``<repo>/.venv-checkov``, built on first use
by tests/checkov/checkov_env.py, under a minute, reused after): checkov pins boto3 below topx's, so it
never shares ``.venv``. If that environment cannot be built the test fails; it never skips.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aws_cdk import App
from cdk_nag import AwsSolutionsChecks

from infra.access import MANAGED_POLICIES, UNSCOPED_ACTIONS
from infra.app import build_app
from infra.lambdas import SPECS
from infra.settings import REPO_ROOT
from topx.contract import STACK_NAME, TRIGGER_PARTITION

CHECKOV_DIR = Path(__file__).resolve().parents[1] / "checkov"
RELIABILITY_DOC = REPO_ROOT / "docs" / "RELIABILITY.md"
CHECKOV_TIMEOUT_S = 300
# Every optional feature on, so the template holds every resource the stack can make.
FULL_CONTEXT = {
    "spot": "true",
    "schedule": "rate(7 days)",
    "notification_email": "ops@example.com",
}
# A literal environment value under a name like these is a secret in plain sight: secrets belong in
# Secrets Manager / SSM, passed by reference (Batch `Secrets`), never by value.
SECRET_NAME_RE = re.compile(r"SECRET|PASSW(OR)?D|TOKEN|KEY|CREDENTIAL|PRIVATE", re.IGNORECASE)
# Values that are credentials whatever the name: AWS access key ids, PEM private keys.
SECRET_VALUE_RE = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|-----BEGIN [A-Z ]*PRIVATE KEY-----")
# Resource policies may let an AWS service principal in without a condition only where AWS documents no
# condition that works: SNS encrypts EventBridge's messages with the topic key, and that KMS request carries
# no source ARN or account (see infra/notifications.py).
UNCONDITIONED_SERVICE_GRANTS = {("AWS::KMS::Key", "events.amazonaws.com")}
# Resource types that hold data; each must have an encryption check below, so a new kind of store
# cannot slip in unchecked.
DATA_STORES = (
    "AWS::S3::Bucket", "AWS::DynamoDB::Table", "AWS::SNS::Topic", "AWS::Logs::LogGroup", "AWS::SQS::Queue",
    "AWS::Kinesis::Stream", "AWS::EFS::FileSystem", "AWS::EC2::Volume", "AWS::RDS::DBInstance",
    "AWS::RDS::DBCluster", "AWS::ElastiCache::ReplicationGroup", "AWS::SecretsManager::Secret",
    "AWS::KinesisFirehose::DeliveryStream", "AWS::StepFunctions::Activity",
)  # fmt: skip


# --- the synthesized template ------------------------------------------------------------------------


@dataclass(frozen=True)
class Synthesized:
    app: App
    outdir: Path
    template_path: Path
    template: dict[str, Any]

    def resources(self, *types: str) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.template["Resources"].items() if v["Type"] in types}

    def properties(self, *types: str) -> dict[str, dict[str, Any]]:
        return {k: v.get("Properties", {}) for k, v in self.resources(*types).items()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Synthesized:
    outdir = tmp_path_factory.mktemp("security")
    app, _ = build_app(context=FULL_CONTEXT, outdir=str(outdir))
    app.synth()  # runs the AwsSolutions plugin; an unacknowledged finding raises here
    path = outdir / f"{STACK_NAME}.template.json"
    return Synthesized(app, outdir, path, json.loads(path.read_text(encoding="utf-8")))


def _render(value: Any) -> str:
    """A CloudFormation value as text: references become ``<LogicalId>`` / ``<LogicalId.Attr>``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and len(value) == 1:
        [(function, argument)] = value.items()
        if function == "Ref":
            return f"<{argument}>"
        if function == "Fn::GetAtt":
            return f"<{'.'.join(argument) if isinstance(argument, list) else argument}>"
        if function == "Fn::Join":
            separator, parts = argument
            return separator.join(_render(part) for part in parts)
        if function == "Fn::Sub":
            return argument if isinstance(argument, str) else argument[0]
    return json.dumps(value, sort_keys=True)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# --- IAM: actions and resources named ----------------------------------------------------------------


def identity_policies(template: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, policy document) for every identity policy: inline, AWS::IAM::Policy, managed."""
    for logical_id, resource in template["Resources"].items():
        props = resource.get("Properties", {})
        if resource["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
            yield logical_id, props["PolicyDocument"]
        elif resource["Type"] in ("AWS::IAM::Role", "AWS::IAM::User", "AWS::IAM::Group"):
            for inline in props.get("Policies", []):
                yield f"{logical_id}/{inline.get('PolicyName')}", inline["PolicyDocument"]


def wildcard_findings(template: dict[str, Any]) -> list[str]:
    """Every Allow statement that names no action or no resource, except what UNSCOPED_ACTIONS allows."""
    findings = []
    for where, document in identity_policies(template):
        for statement in _as_list(document["Statement"]):
            if statement.get("Effect") != "Allow":
                continue
            if "NotAction" in statement or "NotResource" in statement:
                findings.append(f"{where}: NotAction/NotResource grants everything else")
                continue
            actions = [_render(a) for a in _as_list(statement["Action"])]
            resources = [_render(r) for r in _as_list(statement["Resource"])]
            findings += [f"{where}: action wildcard {a!r}" for a in actions if "*" in a]
            if "*" in resources:
                findings += [
                    f"{where}: {a} on Resource '*' is not in infra.access.UNSCOPED_ACTIONS"
                    for a in actions
                    if a not in UNSCOPED_ACTIONS
                ]
            # A whole service in an account (arn:aws:s3:::*, arn:...:logs:<region>:<account>:*) is "*" too.
            findings += [
                f"{where}: resource {r!r} is a whole service"
                for r in resources
                if re.fullmatch(r"arn:[^:]+:[^:]+:[^:]*:[^:]*:\*", r)
            ]
    return findings


def managed_policy_findings(template: dict[str, Any]) -> list[str]:
    findings = []
    for logical_id, props in (
        (k, v.get("Properties", {}))
        for k, v in template["Resources"].items()
        if v["Type"] == "AWS::IAM::Role"
    ):
        for arn in (_render(a) for a in props.get("ManagedPolicyArns", [])):
            name = arn.partition(":iam::aws:policy/")[2]
            if name not in MANAGED_POLICIES:
                findings.append(f"{logical_id}: managed policy {arn} is not in infra.access.MANAGED_POLICIES")
    return findings


def test_iam_statements_name_their_actions_and_resources(synth: Synthesized) -> None:
    assert wildcard_findings(synth.template) == []
    assert managed_policy_findings(synth.template) == []


def test_every_allow_list_entry_is_used(synth: Synthesized) -> None:
    """The allow-lists say exactly what the template needs: no stale entry widens them unnoticed."""
    unscoped: set[str] = set()
    for _, document in identity_policies(synth.template):
        for statement in _as_list(document["Statement"]):
            if statement.get("Effect") == "Allow" and "*" in _as_list(statement.get("Resource")):
                unscoped.update(_as_list(statement["Action"]))
    assert unscoped == set(UNSCOPED_ACTIONS)
    used = {
        _render(arn).partition(":iam::aws:policy/")[2]
        for props in synth.properties("AWS::IAM::Role").values()
        for arn in props.get("ManagedPolicyArns", [])
    }
    assert used == set(MANAGED_POLICIES)


def test_the_wildcard_walker_catches_what_it_should() -> None:
    """A control: planted wildcards are found, allow-listed and scoped statements are not."""
    planted = {
        "Resources": {
            "Policy": {
                "Type": "AWS::IAM::Policy",
                "Properties": {
                    "PolicyDocument": {
                        "Statement": [
                            {"Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::b/*"},
                            {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"},
                            {
                                "Effect": "Allow",
                                "Action": "logs:PutLogEvents",
                                "Resource": "arn:aws:logs:r:1:*",
                            },
                            {"Effect": "Allow", "NotAction": "iam:*", "Resource": "*"},
                            {"Effect": "Allow", "Action": "xray:PutTraceSegments", "Resource": "*"},
                            {"Effect": "Deny", "Action": "*", "Resource": "*"},
                            {
                                "Effect": "Allow",
                                "Action": "s3:GetObject",
                                "Resource": "arn:aws:s3:::b/runs/*",
                            },
                        ]
                    }
                },
            },
            "Role": {
                "Type": "AWS::IAM::Role",
                "Properties": {
                    "ManagedPolicyArns": ["arn:aws:iam::aws:policy/AdministratorAccess"],
                    "Policies": [
                        {
                            "PolicyName": "inline",
                            "PolicyDocument": {
                                "Statement": {"Effect": "Allow", "Action": "*", "Resource": "*"}
                            },
                        }
                    ],
                },
            },
        }
    }
    findings = wildcard_findings(planted)
    assert [f.split(":", 1)[0] for f in findings] == [
        "Policy",
        "Policy",
        "Policy",
        "Policy",
        "Role/inline",
        "Role/inline",
    ]
    assert "'s3:*'" in findings[0] and "s3:GetObject on Resource '*'" in findings[1]
    assert "whole service" in findings[2] and "NotAction" in findings[3]
    assert managed_policy_findings(planted) == [
        "Role: managed policy arn:aws:iam::aws:policy/AdministratorAccess is not in infra.access.MANAGED_POLICIES"
    ]


def test_table_permissions_match_the_store(synth: Synthesized) -> None:
    """The functions may touch only the pointer, user and fallback items, and every call topx/aws/store.py makes
    is granted."""
    store = pytest.importorskip("topx.aws.store")
    calls = set(re.findall(r"\bddb\.([a-z_]+)\(", Path(store.__file__).read_text(encoding="utf-8")))
    needed = {"dynamodb:" + "".join(part.capitalize() for part in call.split("_")) for call in calls}
    granted = {action for spec in SPECS for access in spec.table for action in access.actions}
    assert needed <= granted, f"topx/aws/store.py calls {sorted(needed - granted)}, which no function may"
    leading_keys: set[str] = set()
    for props in synth.properties("AWS::IAM::Policy").values():
        for statement in props["PolicyDocument"]["Statement"]:
            if any(a.startswith("dynamodb:") for a in _as_list(statement["Action"])):
                assert "dynamodb:LeadingKeys" in json.dumps(statement.get("Condition", {}))
                leading_keys.update(statement["Condition"]["ForAllValues:StringLike"]["dynamodb:LeadingKeys"])
    # The partition keys the store reads and writes are the ones granted, and nothing else is.
    # The starter's one item (topx/aws/trigger.py) besides.
    written = {store.pointer_key()["pk"]["S"], store.user_key("u1", "v1")["pk"]["S"],
               store._typed(store.fallback_item_key("v1"))["pk"]["S"], TRIGGER_PARTITION}
    covered = {key for key in written if any(fnmatch.fnmatchcase(key, pattern) for pattern in leading_keys)}
    assert covered == written, leading_keys
    assert len(leading_keys) == 4, leading_keys


# --- secrets -------------------------------------------------------------------------------------------


def environment_variables(template: dict[str, Any]) -> Iterator[tuple[str, str, Any]]:
    """(where, name, value) for every Lambda and Batch container environment variable."""
    for logical_id, resource in template["Resources"].items():
        props = resource.get("Properties", {})
        if resource["Type"] == "AWS::Lambda::Function":
            for name, value in props.get("Environment", {}).get("Variables", {}).items():
                yield logical_id, name, value
        elif resource["Type"] == "AWS::Batch::JobDefinition":
            containers = [props.get("ContainerProperties", {})]
            containers += [
                n.get("Container", {}) for n in props.get("NodeProperties", {}).get("NodeRangeProperties", [])
            ]
            for task in props.get("EcsProperties", {}).get("TaskProperties", []):
                containers += task.get("Containers", [])
            for container in containers:
                for variable in container.get("Environment", []):
                    yield logical_id, variable["Name"], variable.get("Value")


def secret_findings(template: dict[str, Any]) -> list[str]:
    findings = []
    for where, name, value in environment_variables(template):
        if SECRET_NAME_RE.search(name) and isinstance(value, str):
            findings.append(f"{where}: {name} holds a literal value; pass secrets by reference")
        if isinstance(value, str) and SECRET_VALUE_RE.search(value):
            findings.append(f"{where}: {name} holds what looks like a credential")
    return findings


def test_no_environment_variable_holds_a_secret(synth: Synthesized) -> None:
    seen = {
        synth.template["Resources"][where]["Type"] for where, _, _ in environment_variables(synth.template)
    }
    assert seen == {"AWS::Lambda::Function", "AWS::Batch::JobDefinition"}  # the walker sees both kinds
    assert secret_findings(synth.template) == []


def test_the_secret_finder_catches_what_it_should() -> None:
    planted = {
        "Resources": {
            "Fn": {
                "Type": "AWS::Lambda::Function",
                "Properties": {
                    "Environment": {
                        "Variables": {
                            "DB_PASSWORD": "hunter2",
                            "API_KEY_ARN": {"Ref": "Secret"},  # a reference, not a value
                            "TOPX_TABLE": "recs",
                            "NOTE": "AKIAABCDEFGHIJKLMNOP",
                        }
                    }
                },
            },
            "Job": {
                "Type": "AWS::Batch::JobDefinition",
                "Properties": {
                    "ContainerProperties": {"Environment": [{"Name": "github_token", "Value": "ghp_x"}]}
                },
            },
        }
    }
    assert secret_findings(planted) == [
        "Fn: DB_PASSWORD holds a literal value; pass secrets by reference",
        "Fn: NOTE holds what looks like a credential",
        "Job: github_token holds a literal value; pass secrets by reference",
    ]


# --- encryption at rest and in transit -----------------------------------------------------------------


def _bucket_encrypted(props: dict[str, Any]) -> bool:
    rules = props.get("BucketEncryption", {}).get("ServerSideEncryptionConfiguration", [])
    return any(
        r.get("ServerSideEncryptionByDefault", {}).get("SSEAlgorithm")
        in ("AES256", "aws:kms", "aws:kms:dsse")
        for r in rules
    )


ENCRYPTED = {
    "AWS::S3::Bucket": _bucket_encrypted,
    "AWS::DynamoDB::Table": lambda p: p.get("SSESpecification", {}).get("SSEEnabled") is True,
    "AWS::SNS::Topic": lambda p: "KmsMasterKeyId" in p,
    "AWS::Logs::LogGroup": lambda p: "KmsKeyId" in p,
    "AWS::SQS::Queue": lambda p: "KmsMasterKeyId" in p or p.get("SqsManagedSseEnabled") is True,
}


def test_every_store_is_encrypted_at_rest(synth: Synthesized) -> None:
    present = {r["Type"] for r in synth.template["Resources"].values()}
    unchecked = present & set(DATA_STORES) - set(ENCRYPTED)
    assert not unchecked, f"no encryption check for {sorted(unchecked)}: add one"
    for kind in ("AWS::S3::Bucket", "AWS::DynamoDB::Table", "AWS::SNS::Topic", "AWS::Logs::LogGroup"):
        assert kind in present
    plain = [
        f"{logical_id} ({resource['Type']})"
        for logical_id, resource in synth.resources(*ENCRYPTED).items()
        if not ENCRYPTED[resource["Type"]](resource.get("Properties", {}))
    ]
    assert plain == []
    for props in synth.properties("AWS::EC2::LaunchTemplate").values():
        for device in props["LaunchTemplateData"].get("BlockDeviceMappings", []):
            assert device["Ebs"]["Encrypted"] is True
    for logical_id, props in synth.properties("AWS::KMS::Key").items():
        assert props.get("EnableKeyRotation") is True, logical_id


def test_the_train_container_cannot_reach_the_instance_metadata_service(synth: Synthesized) -> None:
    """Batch's EC2 jobs use host networking, where a hop limit does not stop a container: the GPU
    instances drop the train image's user's packets to the metadata address at boot."""
    import re as regex

    from infra.compute import TRAIN_JOB_UID, block_metadata_command

    dockerfile = (Path(__file__).resolve().parents[2] / "batch_jobs" / "train" / "Dockerfile").read_text()
    assert regex.search(rf"useradd [^\n]*--uid {TRAIN_JOB_UID}\b", dockerfile)
    assert f"\nUSER {TRAIN_JOB_UID}\n" in dockerfile
    (props,) = synth.properties("AWS::EC2::LaunchTemplate").values()
    data = props["LaunchTemplateData"]
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    def strings(node: Any) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, dict):
            return [text for value in node.values() for text in strings(value)]
        if isinstance(node, list):
            return [text for value in node for text in strings(value)]
        return []

    texts = strings(data["UserData"])
    assert any("Content-Type: multipart/mixed" in t for t in texts)  # MIME parts, as AWS Batch requires
    assert any(block_metadata_command(TRAIN_JOB_UID) in t for t in texts), texts


def test_every_bucket_denies_requests_without_tls(synth: Synthesized) -> None:
    denied: dict[str, set[str]] = {}
    for props in synth.properties("AWS::S3::BucketPolicy").values():
        bucket = props["Bucket"]["Ref"]
        for statement in props["PolicyDocument"]["Statement"]:
            if (
                statement["Effect"] == "Deny"
                and statement["Action"] == "s3:*"
                and statement["Principal"] in ("*", {"AWS": "*"})
                and statement.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}
            ):
                denied.setdefault(bucket, set()).update(_render(r) for r in _as_list(statement["Resource"]))
    for bucket in synth.resources("AWS::S3::Bucket"):
        # Both the bucket (listing) and every object in it.
        assert denied.get(bucket) == {f"<{bucket}.Arn>", f"<{bucket}.Arn>/*"}, bucket


def test_topics_deny_publishing_without_tls_and_deliver_nothing_over_http(synth: Synthesized) -> None:
    topics = set(synth.resources("AWS::SNS::Topic"))
    secured = set()
    for props in synth.properties("AWS::SNS::TopicPolicy").values():
        for statement in props["PolicyDocument"]["Statement"]:
            if statement["Effect"] == "Deny" and statement.get("Condition") == {
                "Bool": {"aws:SecureTransport": "false"}
            }:
                secured.update(t["Ref"] for t in props["Topics"])
    assert secured == topics
    protocols = {p["Protocol"] for p in synth.properties("AWS::SNS::Subscription").values()}
    assert protocols and "http" not in protocols


def test_jobs_may_only_speak_https_out(synth: Synthesized) -> None:
    for props in synth.properties("AWS::EC2::SecurityGroup").values():
        assert props.get("SecurityGroupIngress", []) == []
        assert [(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in props["SecurityGroupEgress"]] == [
            ("tcp", 443, 443)
        ]
    assert synth.resources("AWS::EC2::SecurityGroupIngress") == {}


# --- no public access ----------------------------------------------------------------------------------


def test_buckets_block_every_kind_of_public_access(synth: Synthesized) -> None:
    for logical_id, props in synth.properties("AWS::S3::Bucket").items():
        block = props.get("PublicAccessBlockConfiguration", {})
        assert all(
            block.get(flag) is True
            for flag in ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets")
        ), logical_id
        assert "AccessControl" not in props, logical_id


RESOURCE_POLICIES = {
    "AWS::S3::BucketPolicy": "PolicyDocument",
    "AWS::SNS::TopicPolicy": "PolicyDocument",
    "AWS::SQS::QueuePolicy": "PolicyDocument",
    "AWS::KMS::Key": "KeyPolicy",
}


def test_resource_policies_let_in_no_one_outside_the_account(synth: Synthesized) -> None:
    """No Allow to "*"; the account itself by its root; services only held to our resources by a condition."""
    for logical_id, resource in synth.resources(*RESOURCE_POLICIES).items():
        document = resource["Properties"][RESOURCE_POLICIES[resource["Type"]]]
        for statement in _as_list(document["Statement"]):
            if statement["Effect"] != "Allow":
                continue
            principal = statement["Principal"]
            assert principal != "*" and "*" not in _as_list(principal.get("AWS", [])), logical_id
            for account in _as_list(principal.get("AWS", [])):
                assert _render(account) == "arn:<AWS::Partition>:iam::<AWS::AccountId>:root", logical_id
            for service in _as_list(principal.get("Service", [])):
                if (resource["Type"], _render(service)) not in UNCONDITIONED_SERVICE_GRANTS:
                    assert statement.get("Condition"), f"{logical_id}: {service} without a condition"
    for permission in synth.properties("AWS::Lambda::Permission").values():
        assert permission["Principal"] != "*"
    assert synth.resources("AWS::Lambda::Url") == {}


def test_eventbridge_may_publish_to_the_topic_for_our_rules_only(synth: Synthesized) -> None:
    rules = [
        {"Fn::GetAtt": [logical_id, "Arn"]}
        for logical_id, props in synth.properties("AWS::Events::Rule").items()
        if props.get("EventPattern", {}).get("source") == ["aws.batch"]
    ]
    assert len(rules) == 2  # a failed job, a blocked queue
    grants = [
        statement
        for props in synth.properties("AWS::SNS::TopicPolicy").values()
        for statement in props["PolicyDocument"]["Statement"]
        if statement["Effect"] == "Allow"
    ]
    assert [(g["Principal"], g["Condition"]) for g in grants] == [
        ({"Service": "events.amazonaws.com"}, {"ArnEquals": {"aws:SourceArn": rules}})
    ]


# --- each role, only its own -----------------------------------------------------------------------------


def _statements_of_role(synth: Synthesized, role: str) -> list[dict[str, Any]]:
    return [
        statement
        for props in synth.properties("AWS::IAM::Policy").values()
        if {"Ref": role} in props["Roles"]
        for statement in props["PolicyDocument"]["Statement"]
    ]


def test_each_function_writes_only_its_own_log_group(synth: Synthesized) -> None:
    functions = synth.properties("AWS::Lambda::Function")
    assert len(functions) == len(SPECS)
    for logical_id, props in functions.items():
        role = props["Role"]["Fn::GetAtt"][0]
        assert "ManagedPolicyArns" not in synth.template["Resources"][role]["Properties"], logical_id
        log_group = props["LoggingConfig"]["LogGroup"]["Ref"]
        logs = [s for s in _statements_of_role(synth, role) if "logs:PutLogEvents" in _as_list(s["Action"])]
        assert [s["Resource"] for s in logs] == [{"Fn::GetAtt": [log_group, "Arn"]}], logical_id


# --- cdk-nag and checkov ---------------------------------------------------------------------------------


def test_cdk_nag_passes_with_every_feature_on(synth: Synthesized) -> None:
    # The app's plugin ran during synth (it lists only plugins that found something) ...
    report = json.loads((synth.outdir / "validation-report.json").read_text(encoding="utf-8"))
    assert [r for r in report["pluginReports"] if r["violations"]] == []
    # ... and the AwsSolutions pack run directly leaves no error or warning unacknowledged.
    findings = [
        (v.rule_name, [r.construct_path for r in v.violating_resources])
        for v in AwsSolutionsChecks().validate_scope(synth.app).violations
    ]
    assert findings == []


def _load_checkov_env() -> ModuleType:
    spec = importlib.util.spec_from_file_location("topx_checkov_env", CHECKOV_DIR / "checkov_env.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkov() -> tuple[ModuleType, Path]:
    env = _load_checkov_env()
    try:
        return env, env.ensure_checkov_python()
    except env.CheckovEnvError as exc:
        pytest.fail(f"the checkov environment could not be built: {exc}")


def _scan(checkov: tuple[ModuleType, Path], template: Path) -> dict[str, Any]:
    env, python = checkov
    done = subprocess.run(
        env.checkov_command(python, template), capture_output=True, text=True, timeout=CHECKOV_TIMEOUT_S,
        env=env.clean_env(),
    )  # fmt: skip
    # checkov exits 1 when a check fails; the report says which, so only a missing report is an error.
    assert done.stdout.strip(), f"checkov printed no report (exit {done.returncode}):\n{done.stderr[-4000:]}"
    report = json.loads(done.stdout)
    (report,) = report if isinstance(report, list) else [report]
    assert report["check_type"] == "cloudformation"
    return report


@pytest.fixture(scope="module")
def checkov_report(checkov: tuple[ModuleType, Path], synth: Synthesized) -> dict[str, Any]:
    return _scan(checkov, synth.template_path)


@pytest.mark.slow  # checkov runs in its own environment, built on first use (minutes)
def test_checkov_finds_nothing_without_a_written_reason(
    checkov_report: dict[str, Any], synth: Synthesized
) -> None:
    summary, results = checkov_report["summary"], checkov_report["results"]
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in results["failed_checks"]]
    assert failed == []
    assert summary["parsing_errors"] == 0
    assert summary["resource_count"] == len(synth.template["Resources"])  # it read the whole template
    assert summary["passed"] >= 200
    for check in results["skipped_checks"]:
        comment = check["check_result"].get("suppress_comment", "")
        assert len(comment) >= 40, f"{check['check_id']} on {check['resource']} is skipped without a reason"


@pytest.mark.slow  # checkov runs in its own environment, built on first use (minutes)
def test_every_suppression_and_wildcard_is_documented(checkov_report: dict[str, Any]) -> None:
    doc = RELIABILITY_DOC.read_text(encoding="utf-8")
    section = doc.partition("## Security and least privilege")[2].partition("\n## ")[0]
    assert section, f"{RELIABILITY_DOC} has no '## Security and least privilege' section"
    skipped = {c["check_id"] for c in checkov_report["results"]["skipped_checks"]}
    missing = sorted(
        name
        for name in (*skipped, *UNSCOPED_ACTIONS, *(p.rpartition("/")[2] for p in MANAGED_POLICIES))
        if name not in section
    )
    assert missing == [], f"docs/RELIABILITY.md does not explain {missing}"


@pytest.mark.slow  # checkov runs in its own environment, built on first use (minutes)
def test_checkov_catches_an_unhardened_template(checkov: tuple[ModuleType, Path], tmp_path: Path) -> None:
    """A control: the same scan fails a bare bucket and a key without rotation, so a pass means something."""
    template = tmp_path / "bare.template.json"
    template.write_text(
        json.dumps(
            {
                "Resources": {
                    "Bare": {"Type": "AWS::S3::Bucket", "Properties": {}},
                    "Key": {"Type": "AWS::KMS::Key", "Properties": {"KeyPolicy": {"Statement": []}}},
                }
            }
        )
    )
    failed = {c["check_id"] for c in _scan(checkov, template)["results"]["failed_checks"]}
    assert {"CKV_AWS_18", "CKV_AWS_21", "CKV_AWS_7"} <= failed

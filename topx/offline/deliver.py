"""The upload queue's batching window, offline: ``deliver_uploads`` hands what waits in the queue to the
starter in one batch, as Lambda's SQS event source mapping does on AWS when its batching window closes.

On AWS, EventBridge puts each upload under ``incoming/`` and each end of an execution on the upload queue,
and Lambda invokes the starter with up to ``UPLOAD_BATCH_SIZE`` messages once ``UPLOAD_BATCH_WINDOW_S``
has passed (infra/pipeline.py). moto delivers the rules to the queue itself, but its event source mapping
would invoke the function on every message at once, with no window. Here nothing is read from the queue
until the caller says the window has closed, by calling ``deliver_uploads``: what arrived before the call is
one batch, whatever the machine's speed, so no test depends on timing. The starter is invoked through
moto's Lambda (``topx.offline.execute``'s in-process invocation), and the messages it did not report as
failed are deleted, as the event source mapping deletes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from topx.errors import TopxError
from topx.offline.deploy import LocalPipeline

# As many messages as one batching window hands over on AWS (infra/pipeline.py's UPLOAD_BATCH_SIZE).
BATCH_SIZE = 10_000


class StarterError(TopxError):
    """The starter failed on a batch; its messages stay in the queue for the next delivery."""


@dataclass(frozen=True)
class Delivery:
    """One batch handed to the starter: how many messages, and the starter's reply."""

    messages: int
    reply: dict[str, Any]

    @property
    def started(self) -> str | None:
        return self.reply.get("started")


def deliver_uploads(pipeline: LocalPipeline) -> Delivery | None:
    """Hand every message waiting in the upload queue to the starter, as one batch; None when none waits."""
    import boto3

    sqs = boto3.client("sqs", region_name=pipeline.region)
    queue_arn = sqs.get_queue_attributes(QueueUrl=pipeline.upload_queue_url,
                                         AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    messages: list[dict[str, Any]] = []
    while len(messages) < BATCH_SIZE:
        reply = sqs.receive_message(QueueUrl=pipeline.upload_queue_url, MaxNumberOfMessages=10,
                                    AttributeNames=["All"])
        if not reply.get("Messages"):
            break
        messages.extend(reply["Messages"])
    if not messages:
        return None
    event = {"Records": [{
        "messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"], "body": m["Body"],
        "attributes": m.get("Attributes", {}), "messageAttributes": {}, "md5OfBody": m.get("MD5OfBody", ""),
        "eventSource": "aws:sqs", "eventSourceARN": queue_arn, "awsRegion": pipeline.region,
    } for m in messages]}
    answer = boto3.client("lambda", region_name=pipeline.region).invoke(
        FunctionName=pipeline.starter_arn, Payload=json.dumps(event).encode("utf-8"))
    reply = json.loads(answer["Payload"].read() or b"{}")
    if answer.get("FunctionError"):
        # The event source mapping leaves a failed batch in the queue, to be handed over again.
        for message in messages:
            sqs.change_message_visibility(QueueUrl=pipeline.upload_queue_url,
                                          ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0)
        raise StarterError(f"the starter failed on {len(messages)} message(s): {reply.get('errorType')}: "
                           f"{reply.get('errorMessage')}")
    failed = {item["itemIdentifier"] for item in reply.get("batchItemFailures", [])}
    for message in messages:
        if message["MessageId"] in failed:
            sqs.change_message_visibility(QueueUrl=pipeline.upload_queue_url,
                                          ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0)
        else:
            sqs.delete_message(QueueUrl=pipeline.upload_queue_url, ReceiptHandle=message["ReceiptHandle"])
    return Delivery(len(messages), reply)

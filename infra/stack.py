"""The topx stack: storage, notifications, compute, functions, the pipeline, its alarms and its dashboard."""

from __future__ import annotations

from typing import Any

from aws_cdk import Annotations, CfnOutput, Stack, Tags
from constructs import Construct

from infra.compute import Compute
from infra.dashboard import Dashboard
from infra.lambdas import Functions
from infra.logs import logs_key
from infra.notifications import COMPUTE_HEALTH_STAGE, Notifications
from infra.pipeline import Pipeline
from infra.settings import BASE_IMAGES, DATA_FUNCTIONS, DeploySettings
from infra.storage import Storage
from topx.contract import ENV_SERVICE_NAME, OUTPUT_BUCKET, OUTPUT_STATE_MACHINE, OUTPUT_TABLE, OUTPUT_TOPIC


class TopxStack(Stack):
    def __init__(
        self, scope: Construct, construct_id: str, *, settings: DeploySettings, **kwargs: Any
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        Tags.of(self).add("project", "topx")

        # An image built FROM a tag gets whatever the tag names on the day of the build: said at synth.
        for image in BASE_IMAGES:
            if settings.base_image_digest(image) is None:
                Annotations.of(self).add_warning_v2(
                    f"topx:base-image-tag-{image}",
                    f"the {image} image builds FROM its base image's tag, which may name another image on the next "
                    f"build; pin it with -c 'base_image_digests={{\"{image}\": \"sha256:...\"}}' (docs/DEPLOY.md, "
                    f"Building the images by hand)")
        storage = Storage(self, "Storage", retention_days=settings.retention_days)
        log_key = logs_key(self, "LogsKey")
        notifications = Notifications(self, "Notifications", email=settings.notification_email)
        environment = settings.job_environment(
            bucket=storage.bucket.bucket_name,
            table=storage.table.table_name,
            topic_arn=notifications.topic.topic_arn,
        )
        # The service of every log line and metric: two stacks in one account keep them apart.
        environment[ENV_SERVICE_NAME] = self.stack_name
        compute = Compute(
            self,
            "Compute",
            settings=settings,
            bucket=storage.bucket,
            log_bucket=storage.log_bucket,
            environment=environment,
            logs_key=log_key,
        )
        functions = Functions(
            self,
            "Functions",
            bucket=storage.bucket,
            table=storage.table,
            environment=environment,
            logs_key=log_key,
            base_digest=settings.base_image_digest("functions"),
            memory_mb=dict.fromkeys(DATA_FUNCTIONS, settings.data_function_memory_mb),
        )
        pipeline = Pipeline(
            self,
            "Pipeline",
            functions=functions.by_handler,
            train=compute.train,
            search=compute.search,
            topic=notifications.topic,
            topic_key=notifications.key,
            bucket=storage.bucket,
            table_name=storage.table.table_name,
            schedule=settings.schedule,
            logs_key=log_key,
        )
        alarms = notifications.add_alarms(pipeline.state_machine, [job.queue for job in compute.jobs],
                                          pipeline.trigger_dead_letters, list(functions.by_handler.values()))
        alarms.append(notifications.add_compute_health(functions.by_handler[COMPUTE_HEALTH_STAGE],
                                                       compute.environments, pipeline.trigger_dead_letters,
                                                       self.stack_name))
        Dashboard(
            self,
            "Dashboard",
            state_machine=pipeline.state_machine,
            functions=functions.by_handler,
            function_logs=[function.log_group for function in functions.by_handler.values()],
            alarms=alarms,
        )

        self.storage = storage
        self.state_machine = pipeline.state_machine
        # The client (topx.aws.client) finds the resources by these output names.
        CfnOutput(
            self, OUTPUT_BUCKET, value=storage.bucket.bucket_name, description="Upload data under incoming/"
        )
        CfnOutput(self, OUTPUT_TABLE, value=storage.table.table_name, description="Recommendations table")
        CfnOutput(self, OUTPUT_STATE_MACHINE, value=pipeline.state_machine.state_machine_arn)
        CfnOutput(
            self, OUTPUT_TOPIC, value=notifications.topic.topic_arn, description="Pipeline notifications"
        )
